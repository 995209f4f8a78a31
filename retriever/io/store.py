"""The object store: every artefact path is an fsspec URL.

A bare path or ``file://`` URL is the local filesystem, ``s3://bucket/prefix`` goes through
s3fs (endpoint and keys from the standard ``AWS_*`` variables; botocore honours
``AWS_ENDPOINT_URL_S3``), ``memory://`` is for unit tests. With nothing configured the root
is ``./.retriever`` (or ``$RETRIEVER_STORE``).

Local writes create parent directories first (pyarrow ignores fsspec's ``auto_mkdir``) and
land atomically (write to a temporary name, then rename), so a crash never leaves a
half-written manifest behind. On object stores an upload is only committed when the
``open_write`` block exits cleanly; if it raises, the upload is abandoned and an earlier
version of the object stays (``memory://`` cannot do this: it publishes a file when opened).

Other processes write to the same store, so reads, ``exists`` and ``listdir`` drop fsspec's
cached directory listing for the path first (s3fs would otherwise answer from a listing
taken before another writer's change, or fail reading an object rewritten since).
Text modes are UTF-8.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
from typing import IO, Any, Iterator

import fsspec
from fsspec.core import OpenFile, url_to_fs
from fsspec.spec import AbstractBufferedFile

from retriever.errors import InputError

DEFAULT_ROOT = ".retriever"


def default_root() -> str:
    """The store root: ``$RETRIEVER_STORE`` or ``./.retriever`` (absolute)."""
    root = os.environ.get("RETRIEVER_STORE") or DEFAULT_ROOT
    return root if has_scheme(root) else os.path.abspath(root)


def has_scheme(url: str) -> bool:
    return "://" in url


def is_local(url: str) -> bool:
    return not has_scheme(url) or url.startswith("file://")


def slug(url: str, fallback: str = "x") -> str:
    """The last part of a path or URL, safe as a folder name (``org/Model v2/`` -> ``Model-v2``)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(url).rstrip("/").rsplit("/", 1)[-1]) or fallback


def join(base: str, *parts: str) -> str:
    """Join URL path segments with '/', whatever the scheme.

    The parts stay below ``base``: a part with a ``..`` segment (a name read from a manifest or
    a remote listing, say) is refused rather than followed out of the folder."""
    out = base.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if ".." in part.replace("\\", "/").split("/"):
            raise InputError(f"path {part!r} under {base!r}: '..' would leave the folder")
        if part:
            out = f"{out}/{part}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    return url_to_fs(url)


def _fresh(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``filesystem(url)`` with any cached listing of the path and its parents dropped."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs, path


def _text_kwargs(mode: str) -> dict[str, str]:
    return {} if "b" in mode else {"encoding": "utf-8"}


def exists(url: str) -> bool:
    fs, path = _fresh(url)
    return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly below ``url``; empty if it does not exist."""
    fs, path = _fresh(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@contextlib.contextmanager
def open_write(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``url`` for writing; local files appear atomically when the block exits cleanly."""
    fs, path = filesystem(url)
    parent = posixpath.dirname(path)
    if is_local(url):
        os.makedirs(parent or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, mode, **_text_kwargs(mode)) as handle:
                yield handle
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    if parent:
        with contextlib.suppress(Exception):  # object stores have no real directories
            fs.makedirs(parent, exist_ok=True)
    handle = fs.open(path, mode, **_text_kwargs(mode))
    try:
        yield handle
    except BaseException:
        _abandon(handle)
        raise
    handle.close()  # commits the upload


def _abandon(handle: IO[Any]) -> None:
    """Close an object-store file without committing what was written to it."""
    raw = handle.buffer if isinstance(handle, io.TextIOWrapper) else handle
    if isinstance(raw, AbstractBufferedFile):
        if not raw.closed:
            with contextlib.suppress(Exception):
                raw.discard()  # aborts a multipart upload already under way (s3fs)
            raw.closed = True  # close() would flush and commit the partial data
        return
    with contextlib.suppress(Exception):
        handle.close()


def open_read(url: str, mode: str = "rb", compression: str | None = "infer") -> IO[Any]:
    """Open ``url`` for reading, decompressing ``.gz``/``.bz2``/... by default."""
    fs, path = _fresh(url)
    return OpenFile(fs, path, mode, compression=compression, **_text_kwargs(mode)).open()


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url, "wb") as handle:
        handle.write(data)


def read_bytes(url: str) -> bytes:
    with open_read(url, "rb", compression=None) as handle:
        return handle.read()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: not valid JSON ({err})") from err


def write_parquet(table: "pyarrow.Table", url: str) -> None:  # noqa: F821
    import pyarrow.parquet as pq

    with open_write(url, "wb") as handle:
        pq.write_table(table, handle)


def read_parquet(url: str) -> "pyarrow.Table":  # noqa: F821
    import pyarrow.parquet as pq

    with open_read(url, "rb", compression=None) as handle:
        return pq.read_table(handle)
