"""The matrix evaluation job: Ray Data encode + index + in-cluster search, report, reuse."""

import json

import pytest
import yaml

from jobs import eval as single
from jobs import evaluate
from retriever.evaluation.matrix import DatasetSpec, ModelSpec
from tests.helpers import small_collection


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_matrix_report_equals_single_runs_and_reuses(tmp_path, monkeypatch, ray_local):
    """On a 120-document slice of Medline (the whole collection made this test 3 min)."""
    monkeypatch.setenv("RETRIEVER_STORE", str(tmp_path / "store"))
    medline = small_collection(tmp_path / "medline")
    config_file = tmp_path / "matrix.yaml"
    config_file.write_text(yaml.safe_dump({
        "matrix_id": "t", "baseline": "bm25", "out": str(tmp_path / "out"),
        "models": ["bm25", {"name": "minilm", "model": "minilm", "dtype": "float32"}],
        "datasets": [medline]}))
    records, markdown = evaluate.run(evaluate.cfg.parse(evaluate.MatrixConfig,
                                                        ["--config", str(config_file)], "t"))
    assert [r.reused for r in records] == [False, False]
    for record in records:
        reference = single.run(evaluate.cfg.build(single.EvalConfig, dict(
            dataset=medline, model="minilm" if record.model == "minilm" else "bm25",
            dtype="float32", out=str(tmp_path / "single" / record.model))))
        for key in ("ndcg@10", "mrr@10", "recall@100", "recall@1000"):
            assert record.metrics[key] == pytest.approx(reference[key], abs=1e-4), key
    out = tmp_path / "out"
    assert "| medline |" in (out / "report.md").read_text()
    assert (out / "ndcg.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (out / "report.html").read_text()
    provenance = json.loads((out / "minilm" / "medline" / "provenance.json").read_text())
    assert provenance["model_hash"] and provenance["dataset_hash"]
    assert provenance["throughput"]["docs"] == 120
    again, _ = evaluate.run(evaluate.cfg.parse(evaluate.MatrixConfig,
                                               ["--config", str(config_file)], "t"))
    assert [r.reused for r in again] == [True, True]
    assert [r.metrics["ndcg@10"] for r in again] == [r.metrics["ndcg@10"] for r in records]


def _tiny_dataset(folder, docs=30, queries=4) -> str:
    """A BEIR folder: ``docs`` short documents, ``queries`` queries judging one doc each."""
    words = ["ray", "index", "shard", "query", "vector", "model", "corpus", "score"]
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(
        {"_id": f"d{i:02d}", "title": "", "text": f"{words[i % 8]} {words[i * 3 % 8]} {i}"})
        + "\n" for i in range(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps(
        {"_id": f"q{i}", "text": f"{words[i]} {words[i * 3 % 8]}"}) + "\n"
        for i in range(queries)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i:02d}\t1\n" for i in range(queries)))
    return str(folder)


def test_report_mean_and_t_test_read_the_same_unrounded_per_query_values(tmp_path):
    from retriever.evaluation import matrix_report
    from retriever.pipelines import evaluate as matrix_run
    from retriever.evaluation.matrix import finished
    from retriever.io.formats import load_dataset

    path = _tiny_dataset(tmp_path / "tiny")
    config = matrix_run.MatrixConfig(models=["bm25"], datasets=[path], out=str(tmp_path / "out"))
    data = load_dataset(path, "test")
    cell = matrix_run.plan_cell(config, ModelSpec.parse("bm25"), DatasetSpec.parse(path),
                            data.files, config.out)
    # At run.trec's 6 decimals d00 and d01 tie for q0, and a tie goes to the larger doc id.
    run = {"q0": [("d00", 0.5000004), ("d01", 0.5000001)], "q1": [("d01", 0.3), ("d05", 0.2)]}
    record = matrix_run.write_cell(cell, data, run, {}, 0.0)
    ndcg = matrix_report.ndcg_cells([record])["tiny"]["bm25"]
    assert ndcg.per_query["q0"] == 1.0 and ndcg.per_query["q1"] == 1.0
    assert ndcg.value == sum(ndcg.per_query.values()) / len(ndcg.per_query)
    assert ndcg.value == record.metrics["ndcg@10"] == finished(cell.folder, cell.key)["ndcg@10"]


def test_matrices_share_store_artefacts_and_rerun_after_out_is_deleted(tmp_path, monkeypatch,
                                                                         ray_local):
    import shutil

    monkeypatch.setenv("RETRIEVER_STORE", str(tmp_path / "store"))
    model = {"name": "minilm", "model": "minilm", "passage_max_length": 32}
    tiny = _tiny_dataset(tmp_path / "tiny", docs=20, queries=2)

    def matrix(name):
        return evaluate.run(evaluate.MatrixConfig(models=[model], datasets=[tiny],
                                                  matrix_id=name, out=str(tmp_path / name)))[0][0]

    first = matrix("a")
    index = json.loads(next((tmp_path / "store" / "indexes").rglob("manifest.json"))
                       .read_text())
    second = matrix("b")  # another matrix sharing the (model, dataset) cell
    shutil.rmtree(tmp_path / "a")
    again = matrix("a")
    assert [first.reused, second.reused, again.reused] == [False, False, False]
    assert first.metrics["ndcg@10"] == second.metrics["ndcg@10"] == again.metrics["ndcg@10"]
    manifests = list((tmp_path / "store" / "indexes").rglob("manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text()) == index  # reused


def test_a_model_entry_runs_only_the_datasets_it_names(tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("RETRIEVER_STORE", str(tmp_path / "store"))
    first, second = _tiny_dataset(tmp_path / "a"), _tiny_dataset(tmp_path / "b", docs=24)
    records, markdown = evaluate.run(evaluate.MatrixConfig(
        models=["bm25", {"name": "bm25-a", "model": "bm25", "datasets": ["a"]}],
        datasets=[first, second], matrix_id="m", out=str(tmp_path / "m")))
    assert [(r.model, r.dataset) for r in records] == [("bm25", "a"), ("bm25-a", "a"),
                                                       ("bm25", "b")]
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines()
            if line.startswith("| ")}
    assert rows["b"].endswith("| - |") and rows["*average*"].endswith("| - |")
    assert not rows["a"].endswith("| - |")
    with pytest.raises(ValueError, match="'bm25-c': datasets c not in the matrix"):
        evaluate.run(evaluate.MatrixConfig(
            models=[{"name": "bm25-c", "model": "bm25", "datasets": ["c"]}],
            datasets=[first], matrix_id="m", out=str(tmp_path / "m")))


def test_matrix_entries_are_validated():
    assert ModelSpec.parse("minilm").name == "minilm"
    spec = ModelSpec.parse({"name": "zs", "model": "smollm2-135m", "prompt": "one-word"})
    assert spec.encoder_options() == {"prompt": "one-word"}
    with pytest.raises(ValueError, match="unknown option"):
        ModelSpec.parse({"model": "minilm", "colour": "red"})
    with pytest.raises(ValueError, match="datasets must be a list of dataset names"):
        ModelSpec.parse({"model": "minilm", "datasets": "scifact"})
    with pytest.raises(ValueError, match="expected a path"):
        DatasetSpec.parse({"split": "test"})
