"""Model directories in object storage (a cluster's training run writes its merged model and
adapter to s3://...): resolved by copying them once into the local cache, on a real S3 server."""

import json

import numpy as np
import pytest

from retriever.io import store
from retriever.modeling import identity
from retriever.modeling.encoder import Encoder
from retriever.modeling.registry import ModelNotFound, resolve_model
from tests.train_fixtures import tiny_bert


def _upload(local_dir, url):
    fs, path = store.filesystem(url)
    fs.put(str(local_dir), path, recursive=True)


@pytest.mark.s3
def test_a_model_directory_on_s3_encodes_like_its_local_copy(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVER_CACHE", str(tmp_path / "cache"))
    local = tiny_bert(tmp_path / "tiny-bert")
    url = store.join(s3_env, "runs", "r1", "train", "merged")
    _upload(local, url)

    resolved = resolve_model(url)
    assert resolved.name == url
    assert str(tmp_path / "cache" / "remote") in resolved.path
    assert resolved.defaults == resolve_model(str(local)).defaults  # retriever.json came along
    # the copy carries the identity of the bytes it copied: the same as the directory's own
    assert resolved.identity() == identity.compute(local)["identity"]
    assert identity.stored(resolved.path) is not None
    texts = ["a passage about wings", "another about engines"]
    remote = Encoder(model=url, dtype="float32").encode_passages(texts)
    near = Encoder(model=str(local), dtype="float32").encode_passages(texts)
    np.testing.assert_allclose(remote, near, atol=1e-6)

    # a changed remote directory is fetched again; an unchanged one is not
    assert resolve_model(url).path == resolved.path
    settings = json.loads((local / "retriever.json").read_text())
    settings["defaults"]["passage_max_length"] = 7
    store.write_text(store.join(url, "retriever.json"), json.dumps(settings, indent=4))
    assert resolve_model(url).defaults.passage_max_length == 7


@pytest.mark.s3
def test_a_missing_remote_model_is_named(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVER_CACHE", str(tmp_path / "cache"))
    missing = store.join(s3_env, "no", "such", "model")
    with pytest.raises(ModelNotFound, match="no/such/model"):
        resolve_model(missing)
