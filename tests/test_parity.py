"""Train/serve parity: an index is searched only by a query encoder that embeds like its own.

Tiny random-weight BERT models (MiniLM's tokenizer, 32 dims) stand in for real ones, so the
serve app build and the evaluation's search task are checked in seconds without Ray.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from retriever.index import shards as sh
from retriever.modeling.parity import EncoderMismatch, check_encoder_matches, differences
from tests.index_fixtures import write_embeddings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


def tiny_model(folder: Path, seed: int, hidden: int = 32) -> str:
    """A random-weight BERT directory (mean pooling, normalised) with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from retriever.modeling.registry import EncoderDefaults, resolve_model, write_settings

    minilm = Path(resolve_model("minilm").path)
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, folder / name)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    write_settings(folder, EncoderDefaults(pooling="mean", query_max_length=32,
                                           passage_max_length=64))
    return str(folder)


def encoder_settings(model: str, **options) -> dict:
    """What the encode pipeline records for ``model`` (``Encoder.settings()``)."""
    from retriever.modeling.encoder import EncoderConfig
    from retriever.modeling.parity import query_settings

    return query_settings(EncoderConfig(model=model, **options))


def index_of(folder: Path, settings: dict, rows: int = 50) -> str:
    """A one-shard flat index over random vectors whose embeddings recorded ``settings``."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, settings["dim"])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_embeddings(str(folder / "emb"), [f"d{i}" for i in range(rows)], vectors, settings)
    out = str(folder / "index")
    sh.build(str(folder / "emb"), out, 1, sh.IndexSpec("flat"), recall_queries=0)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-models")
    return {"a": tiny_model(root / "a", seed=0), "b": tiny_model(root / "b", seed=1),
            "wide": tiny_model(root / "wide", seed=2, hidden=48)}


@pytest.fixture(scope="module")
def index_a(models, tmp_path_factory):
    """An index encoded by model a with its defaults (mean pooling)."""
    return index_of(tmp_path_factory.mktemp("parity-index"), encoder_settings(models["a"]))


# ------------------------------------------------------------------------ the check itself

def test_each_differing_field_is_named_with_both_sides_unless_allowed():
    index = {"model": "m", "model_hash": "aa", "pooling": "mean", "normalize": True,
             "query_prefix": "query: ", "passage_prefix": "passage: ", "dtype": "bfloat16",
             "dim": 384}
    query = {**index, "pooling": "cls", "query_prefix": "", "passage_prefix": "",
             "dtype": "float32"}
    with pytest.raises(EncoderMismatch) as refused:
        check_encoder_matches(index, query, index_name="index s3://x/flat-1")
    message = str(refused.value)
    assert "index s3://x/flat-1" in message
    assert "pooling: index 'mean' vs query 'cls'" in message
    assert "query_prefix: index 'query: ' vs query ''" in message
    assert "passage_prefix" not in message and "dtype" not in message  # recorded only
    assert "--allow-asymmetric-encoder" in message
    allowed = check_encoder_matches(index, query, allow_asymmetric=True)
    assert allowed == {"pooling": ("mean", "cls"), "query_prefix": ("query: ", "")}


def test_weights_identity_decides_and_unrecorded_fields_are_not_compared():
    index = {"model": "/models/m", "model_hash": "aa", "dim": 8}
    assert differences(index, {"model": "m", "model_hash": "aa", "dim": 8,
                               "pooling": "cls"}) == {}  # same weights under another name
    assert differences(index, {"model": "/models/m", "model_hash": "bb", "dim": 8}) == {
        "model_hash": ("aa", "bb")}
    old = {"model": "minilm", "pooling": "mean", "dim": 384}  # a record without a hash
    assert differences(old, {"model": "e5", "model_hash": "cc", "pooling": "mean",
                             "dim": 384}) == {"model": ("minilm", "e5")}


def test_the_index_manifest_carries_the_embeddings_encoder_settings(models, index_a):
    from retriever.modeling.parity import index_settings

    recorded = index_settings(sh.read_manifest(index_a))
    assert recorded == encoder_settings(models["a"])
    assert recorded["model_hash"] and recorded["pooling"] == "mean" and recorded["dim"] == 32


# ------------------------------------------------------------------------ serve

def test_serve_refuses_an_index_of_other_weights_unless_the_flag_says_so(models, index_a):
    from retriever import config as cfg
    from serve.app import build_app
    from serve.launch import ServeConfig, app_args

    assert type(build_app({"index": index_a})).__name__ == "Application"  # its own encoder
    with pytest.raises(EncoderMismatch) as refused:
        build_app({"index": index_a, "model": models["b"]})
    message = str(refused.value)
    assert f"index {index_a}" in message and "model_hash: index '" in message
    assert models["a"] in message and models["b"] in message
    flags = ["--index", index_a, "--model", models["b"], "--allow-asymmetric-encoder"]
    args = app_args(cfg.parse(ServeConfig, flags, prog="retriever serve"))
    assert args["allow_asymmetric_encoder"] is True
    assert type(build_app(args)).__name__ == "Application"
    assert type(build_app({"index": index_a, "model": models["b"],
                           "allow_asymmetric_encoder": "true"})).__name__ == "Application"


def test_the_in_process_backend_checks_parity_too(models, index_a):
    from retriever.modeling.encoder import Encoder, EncoderConfig
    from serve.local import LocalBackend

    assert LocalBackend(index_a).info()["dims"] == 32  # its own recorded encoder
    with pytest.raises(EncoderMismatch, match="model_hash: index '"):
        LocalBackend(index_a, model=models["b"])
    with pytest.raises(EncoderMismatch, match="pooling: index 'mean' vs query 'cls'"):
        LocalBackend(index_a, encoder=Encoder(EncoderConfig(model=models["a"], pooling="cls")))
    assert LocalBackend(index_a, model=models["b"], allow_asymmetric_encoder=True).dim == 32


def test_serve_refuses_an_index_whose_model_changed_since_it_was_encoded(models, tmp_path):
    from serve.app import build_app

    model = tiny_model(tmp_path / "retrained", seed=3)
    index = index_of(tmp_path, encoder_settings(model))
    build_app({"index": index})
    tiny_model(tmp_path / "other", seed=4)  # new weights under the same path
    shutil.copy(tmp_path / "other" / "model.safetensors", Path(model) / "model.safetensors")
    with pytest.raises(EncoderMismatch, match="model_hash: index '"):
        build_app({"index": index})


def test_serve_refuses_a_query_encoder_of_another_dimension(models, index_a):
    from serve.app import build_app

    with pytest.raises(EncoderMismatch, match="dim: index 32 vs query 48"):
        build_app({"index": index_a, "model": models["wide"]})


# ------------------------------------------------------------------------ evaluation

def test_evaluation_search_refuses_an_index_encoded_with_other_pooling(models, index_a):
    from retriever.pipelines.evaluate import MatrixConfig, _search_task

    with pytest.raises(EncoderMismatch) as refused:
        _search_task(index_a, models["a"], {"pooling": "cls"}, ["a query"], 5)
    assert "pooling: index 'mean' vs query 'cls'" in str(refused.value)
    hits = _search_task(index_a, models["a"], {"pooling": "cls"}, ["a query"], 5,
                        allow_asymmetric=True)
    assert len(hits[0]) == 5
    assert len(_search_task(index_a, models["a"], {}, ["a query"], 5)[0]) == 5
    assert MatrixConfig(models=[], datasets=[]).allow_asymmetric_encoder is False
