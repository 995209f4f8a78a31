"""Content identity of a model directory: the sha256 of every file in it, and one hash of those.

In: a local model directory. Out: ``identity.json`` beside the weights
(``{"files": {relative path: {"sha256", "size"}}, "identity": hex}``, written by
:func:`write_identity`) and :func:`directory_identity`, the directory's identity as hex.

Counted are all regular files below the directory except ``identity.json`` itself and hidden
names (a cache's own markers, ``.gitattributes``): tokenizer files and ``retriever.json`` change
the vectors as much as the weights do. The identity hashes the sorted (path, sha256) pairs.

Every writer of a model directory (the training export, the GGUF conversion, the remote model
cache) writes ``identity.json`` last, so a load need not re-hash gigabytes. The rule for trusting
a stored file, cheap and sound for those writers: it lists exactly the files present, each with
its size, and none of them changed (inode change time) after ``identity.json`` was written.
Otherwise - no stored file (a packaged wheel, a Hugging Face directory we did not write), a file
replaced or edited in place since - the hashes are computed from the bytes, memoised in this
process by path, size, inode and change times.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

IDENTITY_FILE = "identity.json"

_file_hashes: dict[tuple, str] = {}  # (path, size, inode, mtime_ns, ctime_ns) -> sha256


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (memoised while the file is unchanged)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def is_safe_relative(name: str) -> bool:
    """A relative path that stays below its folder (no absolute path, no '..' part)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and not name.startswith(("/", "\\")) and ".." not in parts


def counted_files(directory: Path) -> dict[str, Path]:
    """The files the identity covers, by path relative to ``directory`` (posix)."""
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if (path.is_file() and relative.as_posix() != IDENTITY_FILE
                and not any(part.startswith(".") for part in relative.parts)):
            files[relative.as_posix()] = path
    return files


def _combine(files: dict[str, dict]) -> str:
    pairs = sorted((name, entry["sha256"]) for name, entry in files.items())
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def compute(directory: str | Path) -> dict:
    """The identity record of ``directory`` from its bytes."""
    files = {name: {"sha256": file_sha256(path), "size": path.stat().st_size}
             for name, path in counted_files(Path(directory)).items()}
    return {"files": files, "identity": _combine(files)}


def write_identity(directory: str | Path) -> str:
    """Hash the directory's files and store ``identity.json`` (atomically); its identity."""
    directory = Path(directory)
    record = compute(directory)
    staging = directory / f".{IDENTITY_FILE}.{os.getpid()}"
    staging.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(staging, directory / IDENTITY_FILE)
    return record["identity"]


def parse(text: str) -> dict | None:
    """An identity record from ``identity.json`` text; None if it is not a well-formed one."""
    try:
        record = json.loads(text)
        files = record["files"]
        valid = (isinstance(record["identity"], str) and all(
            is_safe_relative(name) and isinstance(entry["sha256"], str)
            and isinstance(entry["size"], int) for name, entry in files.items()))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return record if valid and _combine(files) == record["identity"] else None


def stored(directory: str | Path) -> dict | None:
    """The stored record if the trust rule (module docstring) holds for it, else None."""
    directory = Path(directory)
    marker = directory / IDENTITY_FILE
    if not marker.is_file():
        return None
    record = parse(marker.read_text())
    if record is None:
        return None
    written = marker.stat().st_ctime_ns
    present = counted_files(directory)
    if set(present) != set(record["files"]):
        return None
    for name, path in present.items():
        stat = path.stat()
        if stat.st_size != record["files"][name]["size"] or stat.st_ctime_ns > written:
            return None
    return record


def directory_identity(directory: str | Path) -> str:
    """The identity of ``directory``: the stored one when trusted, else computed."""
    record = stored(directory) or compute(directory)
    return record["identity"]
