"""Sharded FAISS indexes (retriever/index/shards.py) and the index job (`retriever index`)."""

from __future__ import annotations

import json
import subprocess
import sys

import faiss
import numpy as np
import pytest

from jobs.cli import main
from retriever.index import shards as sh
from retriever.io import store
from retriever.errors import InputError
from retriever.evaluation.metrics import evaluate
from retriever.index.ranking import order
from retriever.index.exact import ExactSearcher
from tests.helpers import REPO
from tests.index_fixtures import cache_dir, scifact_minilm, write_embeddings


def random_embeddings(folder, rows=1200, dim=32, seed=0, rows_per_part=250):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"doc{i:05d}" for i in range(rows)]
    write_embeddings(str(folder), ids, vectors, {"model": "minilm"},
                     rows_per_part=rows_per_part)
    return ids, vectors


@pytest.fixture(scope="module")
def scifact(pytestconfig, tmp_path_factory):
    cache = cache_dir(pytestconfig, tmp_path_factory)
    return scifact_minilm(cache)


# --------------------------------------------------------------------------- exactness, recall

@pytest.mark.slow
def test_four_flat_shards_merge_to_the_single_flat_index_top100(scifact, tmp_path):
    out = str(tmp_path / "flat-4")
    manifest = sh.build(scifact.folder, out, 4, sh.IndexSpec("flat"))
    assert [s["rows"] for s in manifest["shards"]] == [1295, 1296, 1296, 1296]
    ids, vectors = sh.embeddings.load(scifact.folder)
    merged = sh.search_all(sh.load_all(out), scifact.query_vectors, 100)
    single = ExactSearcher(vectors, ids).search(scifact.query_vectors, 100)
    assert len(merged) == 300
    for got, want in zip(merged, single):
        assert [d for d, _ in got] == [d for d, _ in want]  # same ids, same order
        assert [s for _, s in got] == [s for _, s in want]
    # and the ranking is the trec_eval order the metrics use
    assert all(hits == order(hits) for hits in merged)
    run = dict(zip(scifact.query_ids, merged))
    assert evaluate(scifact.dataset.qrels, run)["ndcg@10"] == pytest.approx(0.645, abs=0.003)


@pytest.mark.slow
def test_ivfpq_shards_reach_recall_095_at_the_chosen_nprobe(scifact, tmp_path, capsys):
    out = str(tmp_path / "ivfpq-4")
    queries = str(tmp_path / "query-vectors")  # recall is measured with the real queries
    write_embeddings(queries, scifact.query_ids, scifact.query_vectors, scifact.settings)
    assert main(["index", "--embeddings", scifact.folder, "--shards", "4", "--type", "ivfpq",
                 "--queries", queries, "--out", out]) == 0
    printed = capsys.readouterr().out
    manifest = sh.read_manifest(out)
    recall = manifest["recall"]
    nprobe = manifest["search_params"]["nprobe"]
    assert recall["chosen"] == nprobe and recall["value"] >= 0.95
    assert recall["queries"] == 300 and recall["queries_from"] == queries
    assert f"recall@10 vs exact" in printed and f"nprobe={nprobe}" in printed
    nlist = int(manifest["factory"].split(",")[0][3:])
    assert nprobe < nlist  # the target is met before scanning every list
    # one training for all shards: every shard has the same centroids as trained.faiss
    trained = faiss.extract_index_ivf(sh.from_bytes(store.read_bytes(f"{out}/trained.faiss")))
    shards = sh.load_all(out, gpu="no")
    want = trained.quantizer.reconstruct_n(0, nlist)
    for shard in shards:
        ivf = faiss.extract_index_ivf(shard.index)
        assert np.array_equal(ivf.quantizer.reconstruct_n(0, nlist), want)
        assert ivf.nprobe == nprobe
    # recall of the real SciFact queries against exact search, at the chosen nprobe
    ids, vectors = sh.embeddings.load(scifact.folder)
    exact = ExactSearcher(vectors, ids).search(scifact.query_vectors, 10)
    approx = sh.search_all(shards, scifact.query_vectors, 10)
    measured = sh.recall(exact, approx)
    print(f"IVF-PQ {manifest['factory']}, 4 shards: recall@10 vs exact on SciFact's 300 queries "
          f"= {measured:.4f} at nprobe={nprobe} (reported by the job: {recall['value']:.4f})")
    assert measured >= 0.95
    assert measured == pytest.approx(recall["value"], abs=1e-9)  # the job measured the same
    # the index is much smaller than the vectors it holds
    index_bytes = sum(len(store.read_bytes(f"{out}/{s['index']}")) for s in manifest["shards"])
    assert index_bytes < vectors.nbytes / 2


def test_hnsw_shards_choose_ef_search_for_the_target(tmp_path):
    ids, vectors = random_embeddings(tmp_path / "emb")
    out = str(tmp_path / "hnsw")
    manifest = sh.build(str(tmp_path / "emb"), out, 2, sh.IndexSpec("hnsw", hnsw_m=16),
                        recall_queries=100)
    assert manifest["factory"] == "HNSW16,Flat"
    ef = manifest["search_params"]["efSearch"]
    assert manifest["recall"]["value"] >= 0.95 and manifest["recall"]["chosen"] == ef
    shards = sh.load_all(out)
    assert faiss.downcast_index(shards[0].index).hnsw.efSearch == ef
    queries = vectors[:50] + 0.05
    exact = ExactSearcher(vectors, ids).search(queries, 10)
    assert sh.recall(exact, sh.search_all(shards, queries, 10)) >= 0.9


# --------------------------------------------------------------------------- format and job

def test_index_folder_format_and_manifest(tmp_path):
    ids, vectors = random_embeddings(tmp_path / "emb", rows=1001)
    out = tmp_path / "idx"
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--shards", "3",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "retriever.index/1"
    assert manifest["type"] == "flat" and manifest["factory"] == "Flat"
    assert manifest["metric"] == "inner_product" and manifest["dim"] == 32
    assert manifest["rows"] == 1001 and [s["rows"] for s in manifest["shards"]] == [333, 334, 334]
    src = manifest["source"]
    assert src["embeddings"] == str(tmp_path / "emb") and src["encoder"] == {"model": "minilm"}
    assert len(src["manifest_sha256"]) == 64
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json"] + sorted(
        [f"shard-0000{n}.faiss" for n in range(3)] + [f"shard-0000{n}.ids.parquet"
                                                      for n in range(3)])
    seen = []
    for number, entry in enumerate(manifest["shards"]):
        data = (out / entry["index"]).read_bytes()
        assert data[:1] != b"\x80"  # not a pickle: FAISS' own format
        assert sh.hashlib.sha256(data).hexdigest() == entry["sha256"]
        index = faiss.read_index(str(out / entry["index"]))
        shard_ids = store.read_parquet(str(out / entry["ids"])).column("doc_id").to_pylist()
        assert index.ntotal == len(shard_ids) == entry["rows"]
        start = entry["start"]
        assert shard_ids == ids[start:start + entry["rows"]]  # label r is row start + r
        assert np.allclose(index.reconstruct(0), vectors[start])
        seen += shard_ids
    assert seen == ids


def test_default_out_follows_the_store_layout(tmp_path):
    emb = tmp_path / "embeddings" / "scifact" / "minilm"
    random_embeddings(emb, rows=300)
    assert main(["index", "--embeddings", str(emb), "--shards", "2"]) == 0
    assert (tmp_path / "indexes" / "scifact" / "minilm" / "flat-2" / "manifest.json").exists()


def test_shards_load_from_s3(s3_env, tmp_path):
    ids, vectors = random_embeddings(tmp_path / "emb", rows=500)
    emb = f"{s3_env}/embeddings"
    write_embeddings(emb, ids, vectors, {"model": "minilm"}, rows_per_part=200)
    out = f"{s3_env}/index"
    sh.build(emb, out, 2, sh.IndexSpec("flat"))
    assert store.exists(f"{out}/manifest.json")
    from_s3 = sh.load_all(out)
    assert [len(s) for s in from_s3] == [250, 250]
    queries = vectors[:20]
    assert sh.search_all(from_s3, queries, 10) == ExactSearcher(vectors, ids).search(queries, 10)


# --------------------------------------------------------------------------- bad input

def test_missing_embeddings_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.index", "--embeddings",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "nope: no manifest.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_existing_index_is_never_overwritten(tmp_path):
    random_embeddings(tmp_path / "emb", rows=200)
    out = str(tmp_path / "idx")
    sh.build(str(tmp_path / "emb"), out, 2, sh.IndexSpec("flat"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}
    with pytest.raises(InputError, match="already holds an index"):
        sh.build(str(tmp_path / "emb"), out, 1, sh.IndexSpec("flat"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()} == before


def test_finished_index_is_reused_and_rebuilt_when_its_inputs_change(tmp_path):
    ids, vectors = random_embeddings(tmp_path / "emb", rows=200)
    emb, out = str(tmp_path / "emb"), str(tmp_path / "idx")
    first = sh.build(emb, out, 2, sh.IndexSpec("flat"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}
    again = sh.build(emb, out, 2, sh.IndexSpec("flat"))
    assert again["reused"] is True and again["identity"] == first["identity"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()} == before
    rebuilt = sh.build(emb, out, 3, sh.IndexSpec("flat"), replace=True)
    assert "reused" not in rebuilt and len(rebuilt["shards"]) == 3
    assert sh.read_manifest(out)["identity"] == rebuilt["identity"] != first["identity"]
    random_embeddings(tmp_path / "emb", rows=200, seed=1)  # same settings, other vectors
    with pytest.raises(InputError, match="already holds an index"):
        sh.build(emb, out, 3, sh.IndexSpec("flat"))
    sh.build(emb, out, 3, sh.IndexSpec("flat"), replace=True)
    _, other = random_embeddings(tmp_path / "other", rows=200, seed=1)
    hits = sh.search_all(sh.load_all(out), other[:1], 1)[0]
    assert hits[0][0] == "doc00000"  # the new vectors are indexed, not the old ones


@pytest.mark.parametrize("name", ["shard-00001.faiss", "shard-00000.ids.parquet"])
def test_a_changed_shard_file_is_refused_at_load(tmp_path, name):
    random_embeddings(tmp_path / "emb", rows=200)
    out = str(tmp_path / "idx")
    sh.build(str(tmp_path / "emb"), out, 2, sh.IndexSpec("flat"))
    path = tmp_path / "idx" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{name}: sha256 does not match the index manifest"):
        sh.load_all(out)


@pytest.mark.parametrize("spec, shards, message", [
    (dict(type="flat"), 300, "200 rows cannot fill 300 shards"),
    (dict(type="ivfpq", pq_m=5), 1, "pq_m 5 must divide the embedding dimension 32"),
    (dict(type="ivfpq", nlist=64), 1, "nlist 64 needs >= 2496 training vectors, 200"),
    (dict(type="flat", factory="IVF4,Nonsense"), 1, "FAISS factory string 'IVF4,Nonsense'"),
])
def test_bad_settings_are_clear_errors_and_write_nothing(tmp_path, spec, shards, message):
    random_embeddings(tmp_path / "emb", rows=200)
    with pytest.raises(InputError, match=message):
        sh.build(str(tmp_path / "emb"), str(tmp_path / "idx"), shards, sh.IndexSpec(**spec))
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_corrupt_embedding_part_is_detected(tmp_path):
    random_embeddings(tmp_path / "emb", rows=300, rows_per_part=100)
    part = tmp_path / "emb" / "part-00001.parquet"
    other = (tmp_path / "emb" / "part-00002.parquet").read_bytes()
    part.write_bytes(other)  # a valid parquet file, but not the one the manifest names
    with pytest.raises(InputError, match="part-00001.parquet: sha256 does not match"):
        sh.build(str(tmp_path / "emb"), str(tmp_path / "idx"), 2, sh.IndexSpec("flat"))
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_shard_search_orders_ties_by_doc_id_descending(tmp_path):
    vectors = np.tile(np.eye(4, dtype=np.float32)[:1], (40, 1))  # 40 identical documents
    ids = [f"d{i:02d}" for i in range(40)]
    write_embeddings(str(tmp_path / "emb"), ids, vectors, {"model": "minilm"})
    sh.build(str(tmp_path / "emb"), str(tmp_path / "idx"), 3, sh.IndexSpec("flat"))
    hits = sh.search_all(sh.load_all(str(tmp_path / "idx")), vectors[:1], 5)[0]
    assert [d for d, _ in hits] == ["d39", "d38", "d37", "d36", "d35"]


def test_an_unreachable_recall_target_takes_the_cheapest_value_on_the_plateau(tmp_path, capsys):
    """4-bit PQ codes and no re-rank cap recall@10 well below 0.95 for every nprobe: the job
    says so and serves the smallest nprobe within 0.005 of the best, not the costliest."""
    from retriever.io import synthetic

    vectors = synthetic.clustered_vectors(6000, dim=64, centres=50, seed=0)
    write_embeddings(str(tmp_path / "emb"), [f"d{i}" for i in range(6000)], vectors,
                     {"model": "synthetic"})
    out = str(tmp_path / "ivfpq")
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--type", "ivfpq",
                 "--nlist", "64", "--pq-m", "4", "--pq-nbits", "4", "--refine", "none",
                 "--out", out]) == 0
    recall = sh.read_manifest(out)["recall"]
    curve = {int(v): r for v, r in recall["per_value"].items()}
    assert not recall["reached"] and max(curve.values()) < 0.95
    plateau = [v for v, r in curve.items() if r >= max(curve.values()) - sh.PLATEAU]
    assert recall["chosen"] == min(plateau) < max(curve)
    assert sh.read_manifest(out)["search_params"]["nprobe"] == recall["chosen"]
    assert "target recall 0.95 not reached" in capsys.readouterr().out
