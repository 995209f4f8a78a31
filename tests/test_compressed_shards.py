"""Compressed shard types (issue 13): ``sq8`` and ``binary`` with rescoring, on SciFact/MiniLM
and on small synthetic vectors (retriever/index/types.py, retriever/index/shards.py)."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from jobs.cli import main
from retriever.index import shards as sh
from retriever.index import types
from retriever.index.exact import ExactSearcher
from retriever.io import synthetic
from retriever.errors import InputError
from tests.index_fixtures import cache_dir, scifact_minilm, write_embeddings


@pytest.fixture(scope="module")
def scifact(pytestconfig, tmp_path_factory):
    return scifact_minilm(cache_dir(pytestconfig, tmp_path_factory))


@pytest.mark.slow
@pytest.mark.parametrize("kind, bytes_per_vector", [
    ("sq8", 384 + 2 * 384),    # SQ8 codes + fp16 rescoring store
    ("binary", 384 // 8 + 384),  # sign bits + SQ8 rescoring store
])
def test_compressed_shards_reach_recall_095_on_scifact(scifact, tmp_path, capsys, kind,
                                                       bytes_per_vector):
    out = str(tmp_path / kind)
    queries = str(tmp_path / "query-vectors")  # recall is measured with the real queries
    write_embeddings(queries, scifact.query_ids, scifact.query_vectors, scifact.settings)
    assert main(["index", "--embeddings", scifact.folder, "--shards", "2", "--type", kind,
                 "--queries", queries, "--out", out]) == 0
    printed = capsys.readouterr().out
    manifest = sh.read_manifest(out)
    # bytes per vector: measured from the files, printed by the job, as the planner predicts
    files = sum(os.path.getsize(os.path.join(out, s["index"])) for s in manifest["shards"])
    size = manifest["bytes_per_vector"]
    assert size["measured"] == pytest.approx(files / 5183, abs=1e-3)
    assert bytes_per_vector <= size["measured"] < bytes_per_vector + 2
    assert abs(size["planner_error"]) < 0.01
    assert f"bytes per vector: {size['measured']:.1f} (shard files)" in printed
    # recall@10 against exact search, chosen k_factor, measured again here from the shards
    recall = manifest["recall"]
    k_factor = manifest["search_params"]["k_factor"]
    assert recall["param"] == "k_factor" and recall["chosen"] == k_factor
    assert recall["value"] >= 0.95 and recall["queries"] == 300
    ids, vectors = sh.embeddings.load(scifact.folder)
    exact = ExactSearcher(vectors, ids).search(scifact.query_vectors, 10)
    shards = sh.load_all(out)
    measured = sh.recall(exact, sh.search_all(shards, scifact.query_vectors, 10))
    print(f"{kind} {manifest['factory']}: {size['measured']:.1f} B/vector (flat: 1536), "
          f"recall@10 vs exact on SciFact's 300 queries {measured:.4f} at k_factor={k_factor}")
    assert measured == pytest.approx(recall["value"], abs=1e-9) and measured >= 0.95
    if kind == "binary":  # rescoring more Hamming candidates is what reaches the target
        assert recall["per_value"]["1"] < recall["value"]


def test_binary_codes_are_sign_bits_searched_by_hamming_like_index_binary_flat():
    vectors = synthetic.clustered_vectors(3000, dim=64, centres=50, seed=3)
    queries = synthetic.clustered_queries(20, dim=64, centres=50, seed=3)
    index = types.new_index("LSH,Refine(SQ8)", 64)
    index.train(vectors)
    index.add(vectors)
    lsh = faiss.downcast_index(faiss.downcast_index(index).base_index)
    codes = faiss.vector_to_array(lsh.codes).reshape(3000, 8)
    assert np.array_equal(codes, np.packbits(vectors > 0, axis=1, bitorder="little"))
    binary = faiss.IndexBinaryFlat(64)
    binary.add(codes)
    want, _ = binary.search(np.packbits(queries > 0, axis=1, bitorder="little"), 50)
    got, _ = lsh.search(queries, 50)
    assert np.array_equal(got, want)  # the same Hamming distances, nearest first
    # rescored: the final scores are inner products of the SQ8-decoded vectors
    scores, rows = index.search(queries, 10)
    decoded = faiss.downcast_index(index).refine_index.reconstruct_n(0, 3000)
    assert np.allclose(scores, np.take_along_axis(queries @ decoded.T, rows, 1), atol=1e-4)


@pytest.mark.parametrize("kind, refine, factory", [
    ("sq8", "default", "SQ8,Refine(SQfp16)"), ("sq8", "none", "SQ8"),
    ("sq8", "Flat", "SQ8,Refine(Flat)"), ("binary", "default", "LSH,Refine(SQ8)"),
    ("binary", "SQfp16", "LSH,Refine(SQfp16)"), ("ivfpq", "default", "IVF16,PQ8x4np,Refine(SQ8)"),
])
def test_factory_strings_of_each_type_and_refine(kind, refine, factory):
    spec = types.IndexSpec(kind, refine=refine)
    assert spec.factory_string(64, rows=16, train_rows=1000) == factory


def test_binary_without_a_rescoring_store_is_refused():
    with pytest.raises(InputError, match="binary needs a rescoring store"):
        types.IndexSpec("binary", refine="none")
    with pytest.raises(InputError, match="refine 'PQ4'"):
        types.IndexSpec("sq8", refine="PQ4")


def test_compressed_shards_search_like_exact_on_clustered_vectors(tmp_path):
    vectors = synthetic.clustered_vectors(4000, dim=64, centres=100, seed=1)
    ids = [f"d{i:05d}" for i in range(len(vectors))]
    write_embeddings(str(tmp_path / "emb"), ids, vectors, {"model": "synthetic"})
    queries = synthetic.clustered_queries(100, dim=64, centres=100, seed=1)
    exact = ExactSearcher(vectors, ids).search(queries, 10)
    for kind in ("sq8", "binary"):
        out = str(tmp_path / kind)
        manifest = sh.build(str(tmp_path / "emb"), out, 3, sh.IndexSpec(kind), recall_queries=200)
        assert manifest["recall"]["value"] >= 0.95, manifest["recall"]
        got = sh.search_all(sh.load_all(out), queries, 10)
        assert sh.recall(exact, got) >= 0.95
