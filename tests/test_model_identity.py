"""Model directories carry a full content identity (identity.json): a re-export with the same
file sizes, or weights edited in place, is a different model to every cache; the remote model
cache copies a directory again when its identity changes and never writes outside its folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from retriever.modeling import identity
from retriever.modeling.encoder import Encoder
from retriever.modeling.registry import ModelNotFound, local_copy, resolve_model
from tests.train_fixtures import tiny_bert

TOKEN = 16000  # "kappa": its embedding row lies in the middle of the 4 MB safetensors file
TEXT = "kappa"


class VersionlessFS(MemoryFileSystem):
    """An in-memory store whose listings give names and sizes only (no ETag, no mtime), like
    some HTTP and object stores."""

    protocol = ("versionless",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("versionless://"))

    def find(self, path, *args, **kwargs):
        found = super().find(path, *args, **kwargs)
        if isinstance(found, dict):
            return {name: {k: v for k, v in info.items() if k != "created"}
                    for name, info in found.items()}
        return found


class EscapingFS(VersionlessFS):
    """A store whose listing of a directory also returns a key outside it."""

    protocol = ("escaping",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("escaping://"))

    def find(self, path, *args, **kwargs):
        found = super().find(path, *args, **kwargs)
        if isinstance(found, dict):
            evil = f"{path.rstrip('/')}/../evil"
            found[evil] = {"name": evil, "size": 4, "type": "file"}
        return found


fsspec.register_implementation("versionless", VersionlessFS, clobber=True)
fsspec.register_implementation("escaping", EscapingFS, clobber=True)


def _export(directory: Path, base: Path, shift: float = 0.0) -> Path:
    """An exported model directory: ``base``'s files, the "kappa" embedding row changed by
    ``shift`` (same shapes, so the same file sizes), and its identity.json written last."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(base, directory, ignore=shutil.ignore_patterns(identity.IDENTITY_FILE))
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    row = tensors["embeddings.word_embeddings.weight"][TOKEN]
    row += shift * torch.linspace(-1, 1, len(row))  # not a constant: LayerNorm would undo that
    save_file(tensors, str(weights), metadata={"format": "pt"})
    identity.write_identity(directory)
    return directory


def _vectors(model: str) -> np.ndarray:
    return Encoder(model=model, dtype="float32").encode_passages([TEXT])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("identity") / "tiny-bert")


def test_a_re_export_with_the_same_sizes_is_a_new_model(base, tmp_path):
    model = _export(tmp_path / "merged", base)
    before, before_hash = _vectors(str(model)), resolve_model(str(model)).fingerprint()
    size = (model / "model.safetensors").stat().st_size

    _export(model, base, shift=0.5)
    assert (model / "model.safetensors").stat().st_size == size
    after = resolve_model(str(model))
    assert after.fingerprint() != before_hash
    assert after.identity() == json.loads((model / "identity.json").read_text())["identity"]
    assert not np.allclose(_vectors(str(model)), before)


def test_weights_edited_in_place_are_hashed_again(base, tmp_path):
    model = _export(tmp_path / "merged", base)
    exported = resolve_model(str(model)).fingerprint()
    assert identity.stored(model) is not None  # trusted: no file changed since identity.json

    edited = _export(tmp_path / "edited", base, shift=0.5)
    shutil.copyfile(edited / "model.safetensors", model / "model.safetensors")
    # the change is in the middle of the file, past its first and last MiB
    assert resolve_model(str(model)).fingerprint() != exported
    assert identity.stored(model) is None  # changed after identity.json: not trusted
    assert resolve_model(str(model)).identity() == identity.compute(model)["identity"]


def test_a_directory_without_identity_json_is_hashed_from_its_bytes(base, tmp_path):
    plain = Path(shutil.copytree(base, tmp_path / "plain",
                                 ignore=shutil.ignore_patterns(identity.IDENTITY_FILE)))
    computed = resolve_model(str(plain)).identity()
    assert computed == identity.compute(plain)["identity"]
    assert identity.write_identity(plain) == computed
    assert identity.stored(plain)["files"]["model.safetensors"]["sha256"] == \
        identity.file_sha256(plain / "model.safetensors")


def test_a_remote_re_export_with_the_same_sizes_is_copied_again(base, tmp_path, monkeypatch):
    """A store with no versions in its listing: only identity.json tells the exports apart."""
    from retriever.training.export import upload_dir

    monkeypatch.setenv("RETRIEVER_CACHE", str(tmp_path / "cache"))
    url = "versionless://runs/r1/train/merged"
    upload_dir(_export(tmp_path / "first", base), url)
    first = resolve_model(url)
    first_vectors = _vectors(url)

    upload_dir(_export(tmp_path / "second", base, shift=0.5), url)
    second = resolve_model(url)
    assert second.path != first.path
    assert second.fingerprint() != first.fingerprint()
    assert second.identity() == identity.compute(tmp_path / "second")["identity"]
    assert not np.allclose(_vectors(url), first_vectors)
    assert resolve_model(url).path == second.path  # unchanged now: not copied again


def test_export_writes_identity_json_and_uploads_it_last(base, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from retriever.io import store
    from retriever.modeling.registry import EncoderDefaults
    from retriever.training import export

    peft_model = get_peft_model(AutoModel.from_pretrained(base),
                                LoraConfig(r=2, target_modules=["query", "value"]))
    weights = {n: p.detach().clone() + 0.01 for n, p in peft_model.named_parameters()
               if p.requires_grad}
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    defaults = EncoderDefaults(pooling="mean")
    export.write_adapter(adapter, peft_model, weights, defaults, base_model=str(base))
    export.merge_adapter(adapter, str(base), merged, defaults, str(base))
    for directory in (adapter, merged):
        assert identity.stored(directory)["identity"] == identity.compute(directory)["identity"]
    assert torch.is_tensor(next(iter(weights.values())))

    written = []
    real_open_write = store.open_write
    monkeypatch.setattr(store, "open_write",
                        lambda url, mode="wb": written.append(url) or real_open_write(url, mode))
    export.upload_dir(merged, str(tmp_path / "uploaded"))
    assert written[-1].endswith("/identity.json") and written[-2].endswith("/retriever.json")


def test_a_listed_key_outside_the_folder_is_refused(base, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVER_CACHE", str(tmp_path / "cache"))
    fs = EscapingFS()
    fs.pipe_file("/models/evil", b"evil")
    fs.put(str(base), "/models/m", recursive=True)
    with pytest.raises(ModelNotFound, match=r"models/m/\.\./evil"):
        local_copy("escaping://models/m")
    assert not any(path.name == "evil" for path in (tmp_path / "cache").rglob("*"))
