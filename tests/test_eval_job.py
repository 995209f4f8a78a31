"""The eval job end to end on a real collection, through the `retriever` CLI."""

import json
import subprocess
import sys

import pytest

from jobs.cli import main
from retriever.io.formats import load_dataset
from tests.helpers import REPO, dataset, small_collection
from tests.index_fixtures import cache_dir, scifact_minilm

KEYS = {"ndcg@10", "mrr@10", "recall@100", "recall@1000"}


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def test_bm25_on_scifact(tmp_path, capsys):
    out = tmp_path / "bm25"
    assert main(["eval", "--dataset", dataset("scifact"), "--model", "bm25",
                 "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert KEYS <= set(metrics)
    assert 0.645 <= metrics["ndcg@10"] <= 0.700  # published BM25: 0.665-0.679
    assert metrics["counts"]["queries"] == 300 and metrics["counts"]["docs"] == 5183
    assert metrics["settings"]["model"] == "bm25"
    lines = (out / "run.trec").read_text().splitlines()
    first = lines[0].split()
    assert len(first) == 6 and first[1] == "Q0" and first[3] == "1"
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and f"{metrics['ndcg@10']:.4f}" in printed


@pytest.mark.slow
def test_minilm_on_scifact_reproduces_published_figures(pytestconfig, tmp_path_factory):
    """The eval job's dense run (exact search over the Encoder's vectors, scored with trec_eval
    semantics) of MiniLM on SciFact. The vectors are the ones the index and serve tests share
    (``tests/index_fixtures.py``: the same default Encoder, encoded once per test run)."""
    from retriever.evaluation.retrieval import score_run
    from retriever.index.exact import ExactSearcher
    from retriever.io import embeddings

    encoded = scifact_minilm(cache_dir(pytestconfig, tmp_path_factory))
    ids, vectors = embeddings.load(encoded.folder)
    hits = ExactSearcher(vectors, ids).search(encoded.query_vectors, 1000)
    metrics = score_run(encoded.dataset, dict(zip(encoded.query_ids, hits)))
    assert metrics["ndcg@10"] == pytest.approx(0.645, abs=0.003)
    assert metrics["recall@100"] == pytest.approx(0.925, abs=0.005)
    assert metrics["counts"]["queries"] == 300 and metrics["counts"]["docs"] == 5183
    assert encoded.settings["pooling"] == "mean"
    assert encoded.settings["passage_max_length"] == 256


def test_minilm_through_the_command_line(tmp_path):
    """The dense path of `retriever eval` (a small slice of Medline: the published-figure check
    above covers quality): metrics, run file and the encoder's settings are written."""
    collection = small_collection(tmp_path / "medline-small")
    out = tmp_path / "minilm"
    assert main(["eval", "--dataset", collection, "--model", "minilm", "--top-k", "100",
                 "--out", str(out)]) == 0
    metrics = _metrics(out)
    assert KEYS - {"recall@1000"} <= set(metrics) and metrics["counts"]["docs"] == 120
    judged = len(load_dataset(collection).judged_queries())
    assert metrics["counts"]["queries"] == judged > 10 and 0.3 < metrics["ndcg@10"] <= 1
    assert metrics["settings"]["model"] == "minilm" and metrics["settings"]["pooling"] == "mean"
    assert (out / "run.trec").read_text().count(" Q0 ") == judged * 100


def test_bad_dataset_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2"\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.eval", "--dataset", str(tmp_path),
                           "--model", "bm25", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "corpus.jsonl, line 2: bad JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unknown_model_and_missing_option(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "eval", "--dataset",
                           dataset("cranfield"), "--model", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "model 'nope'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "eval"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "--dataset" in proc.stderr
