"""Hybrid retrieval: BM25 shards (retriever/index/sparse.py), fusion (retriever/index/fusion.py),
`retriever eval --model bm25+<model>` and hybrid entries of the evaluation matrix."""

from __future__ import annotations

import re
import json

import numpy as np
import pytest

from jobs.cli import main
from retriever.errors import InputError
from retriever.evaluation.matrix import ModelSpec
from retriever.index import shards as sh
from retriever.index import sparse
from retriever.index.bm25 import BM25Index
from retriever.index.fusion import FusionConfig, fuse, hybrid_dense_model
from retriever.index.ranking import order
from retriever.io import store
from retriever.io.formats import load_dataset
from tests import helpers
from tests.helpers import dataset
from tests.index_fixtures import write_embeddings


@pytest.fixture(scope="module")
def cranfield_index(tmp_path_factory):
    """Cranfield's documents as a 3-shard flat index (random 8-d vectors: the dense side only
    fixes the shard plan and doc ids) with BM25 shards built by the index job."""
    data = load_dataset(dataset("cranfield"))
    root = tmp_path_factory.mktemp("cranfield")
    emb, out = str(root / "emb"), str(root / "flat-3")
    vectors = np.random.default_rng(0).standard_normal((len(data.corpus), 8)).astype(np.float32)
    write_embeddings(emb, data.corpus.ids, vectors, {"model": "random"}, rows_per_part=500)
    assert main(["index", "--embeddings", emb, "--shards", "3", "--out", out, "--sparse",
                 "true", "--corpus", dataset("cranfield")]) == 0
    return data, emb, out


# --------------------------------------------------------------------------- sparse shards

def test_merged_sparse_shards_equal_one_bm25_index(cranfield_index, capsys):
    data, emb, out = cranfield_index
    manifest = sh.read_manifest(out)
    assert sparse.has_sparse(manifest)
    section = manifest[sparse.KEY]
    assert [s["rows"] for s in section["shards"]] == [s["rows"] for s in manifest["shards"]]
    assert section["stats"]["docs"] == len(data.corpus) == 1398
    shards = sparse.load_all(out)
    assert [s.ids for s in shards] == [sh.IndexShard.load(out, n).ids.to_pylist()
                                       for n in range(3)]
    queries = list(data.judged_queries().values())
    merged = sparse.search_all(shards, queries, 100)
    single = BM25Index(data.corpus.passages(), data.corpus.ids).search(queries, 100)
    assert len(merged) == 225
    for got, want in zip(merged, single):
        assert got == want  # same ids, same order, bit-identical scores
    assert all(hits == order(hits) for hits in merged)
    # a BM25 index of shard 0's documents alone scores with its own statistics, not these
    own = data.corpus.subset(range(len(shards[0])))
    alone = BM25Index(own.passages(), own.ids).search(queries[:5], 10)
    assert alone != shards[0].search(queries[:5], 10)
    # the same corpus and settings again: reused, not rebuilt
    capsys.readouterr()
    assert main(["index", "--embeddings", emb, "--shards", "3", "--out", out, "--sparse",
                 "true", "--corpus", dataset("cranfield")]) == 0
    assert "BM25 shards [466, 466, 466] (reused)" in capsys.readouterr().out


def test_a_changed_sparse_shard_is_refused(cranfield_index, tmp_path):
    _, _, out = cranfield_index
    manifest = sh.read_manifest(out)
    entry = manifest[sparse.KEY]["shards"][1]
    url = store.join(out, entry["file"])
    original = store.read_bytes(url)
    try:
        store.write_bytes(url, original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(InputError, match="sha256 does not match"):
            sparse.SparseShard.load(out, 1)
    finally:
        store.write_bytes(url, original)
    with np.load(url, allow_pickle=False) as arrays:  # plain arrays: no pickle needed
        assert arrays["data"].dtype == np.float32
    with pytest.raises(InputError, match="no BM25 shard 3"):
        sparse.SparseShard.load(out, 3)


def test_a_corpus_not_matching_the_index_is_refused(cranfield_index, tmp_path):
    data, _, _ = cranfield_index
    emb, out = str(tmp_path / "emb"), str(tmp_path / "idx")
    ids = list(reversed(data.corpus.ids))  # the embeddings in another order than the corpus
    write_embeddings(emb, ids, np.ones((len(ids), 4), np.float32), {"model": "random"})
    sh.build(emb, out, 2, sh.IndexSpec("flat"))
    with pytest.raises(InputError, match=rf"dense shard 0 row 0 is doc '{ids[0]}'"):
        sparse.build(out, sparse.CorpusSpec.of_embeddings(emb, dataset("cranfield")))
    assert not sparse.has_sparse(sh.read_manifest(out))
    with pytest.raises(InputError, match="names no corpus files"):
        sparse.CorpusSpec.of_embeddings(emb)


# --------------------------------------------------------------------------- fusion

DENSE = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
SPARSE = [("c", 12.0), ("d", 10.0), ("a", 5.0)]


def test_rrf_matches_hand_computed_scores_and_breaks_ties_by_doc_id():
    fused = fuse(DENSE, SPARSE, 10, FusionConfig("rrf", rrf_k=60))
    # a: 1/61 + 1/63, c: 1/63 + 1/61 (tie: higher doc id first, as trec_eval), b and d: 1/62
    assert [d for d, _ in fused] == ["c", "a", "d", "b"]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)
    assert fused[2][1] == pytest.approx(1 / 62)
    assert fuse(DENSE, SPARSE, 2, FusionConfig()) == fused[:2]  # k=60 is the default
    smaller_k = fuse(DENSE, [], 3, FusionConfig("rrf", rrf_k=0))
    assert smaller_k == [("a", 1.0), ("b", 0.5), ("c", pytest.approx(1 / 3))]


def test_weighted_fusion_of_min_max_normalised_scores():
    fused = dict(fuse(DENSE, SPARSE, 10, FusionConfig("weighted", weight=0.25)))
    # dense normalised: a 1, b 0.5, c 0; sparse: c 1, d 5/7, a 0
    assert fused == pytest.approx({"a": 0.25, "b": 0.125, "c": 0.75, "d": 0.75 * 5 / 7})
    assert [d for d, _ in fuse(DENSE, SPARSE, 2, FusionConfig("weighted", weight=0.25))] == \
        ["c", "d"]


def test_bad_fusion_settings_and_hybrid_names_are_named():
    with pytest.raises(InputError, match="fusion 'borda'"):
        FusionConfig("borda")
    with pytest.raises(InputError, match=r"hybrid weight must be in \[0, 1\], got 1.5"):
        FusionConfig("weighted", weight=1.5)
    assert hybrid_dense_model("bm25+minilm") == "minilm" and hybrid_dense_model("bm25") is None
    for name in ("bm25+", "bm25+bm25", "bm25+ "):
        with pytest.raises(InputError, match=re.escape(f"hybrid model {name!r}")):
            hybrid_dense_model(name)


def test_matrix_hybrid_entries_carry_their_fusion_settings():
    plain = ModelSpec.parse("bm25+minilm")
    assert plain.dense_model == "minilm" and plain.fusion == FusionConfig()
    assert plain.encoder_config().model == "minilm"
    weighted = ModelSpec.parse({"name": "hybrid-w", "model": "bm25+minilm",
                                "fusion": "weighted", "hybrid_weight": 0.7})
    assert weighted.fusion.settings() == {"fusion": "weighted", "hybrid_weight": 0.7}
    with pytest.raises(InputError, match="model entry 'minilm': unknown option.*rrf_k.*"
                                         "for bm25\\+<model> entries"):
        ModelSpec.parse({"model": "minilm", "rrf_k": 10})
    with pytest.raises(InputError, match="model entry 'h': fusion 'max'"):
        ModelSpec.parse({"name": "h", "model": "bm25+minilm", "fusion": "max"})
    with pytest.raises(InputError, match="hybrid model 'bm25\\+'"):
        ModelSpec.parse("bm25+")


def test_matrix_cell_keys_differ_by_fusion_settings(tmp_path):
    from retriever.evaluation.matrix import DatasetSpec
    from retriever.pipelines.evaluate import MatrixConfig, plan_cell

    config = MatrixConfig(models=[], datasets=[])
    spec = DatasetSpec.parse(dataset("medline"))
    files = load_dataset(spec.path).files
    cells = [plan_cell(config, ModelSpec.parse(entry), spec, files, str(tmp_path))
             for entry in ("bm25+minilm", {"name": "x", "model": "bm25+minilm", "rrf_k": 10},
                           "minilm")]
    assert cells[0].settings["rrf_k"] == 60 and cells[1].settings["rrf_k"] == 10
    assert len({cell.key for cell in cells}) == 3
    assert cells[0].model_hash == cells[2].model_hash  # the dense model's weights


# --------------------------------------------------------------------------- eval job

@pytest.fixture(scope="module")
def small_collection(tmp_path_factory):
    return helpers.small_collection(tmp_path_factory.mktemp("medline-small"))


def test_eval_hybrid_gives_a_hybrid_row(small_collection, tmp_path, capsys):
    out = tmp_path / "hybrid"
    assert main(["eval", "--dataset", small_collection, "--model", "bm25+minilm",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    printed = capsys.readouterr().out
    assert "bm25+minilm" in printed and f"{metrics['ndcg@10']:.4f}" in printed
    settings = metrics["settings"]
    assert settings["fusion"] == "rrf" and settings["rrf_k"] == 60
    assert settings["dense"]["model"] and settings["sparse"]["model"] == "bm25"
    assert 0.3 < metrics["ndcg@10"] <= 1.0 and metrics["counts"]["docs"] == 120


def test_eval_refuses_bad_fusion_and_hybrid_names(small_collection, tmp_path, capsys):
    assert main(["eval", "--dataset", small_collection, "--model", "bm25+",
                 "--out", str(tmp_path / "x")]) == 2
    assert "hybrid model 'bm25+'" in capsys.readouterr().err
    assert main(["eval", "--dataset", small_collection, "--model", "bm25+minilm",
                 "--fusion", "weighted", "--hybrid-weight", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "hybrid weight must be in [0, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", small_collection, "--model", "bm25+minilm",
              "--fusion", "borda"])
    assert "fusion" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
