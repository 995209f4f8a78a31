"""The matrix evaluation job: Ray Data encode + index + in-cluster search, report, reuse."""

import json

import pytest
import yaml

from jobs import eval as single
from jobs import evaluate
from retriever.evaluation.matrix import DatasetSpec, ModelSpec
from tests.helpers import dataset


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_matrix_report_equals_single_runs_and_reuses(tmp_path, monkeypatch, ray_local):
    monkeypatch.setenv("RETRIEVER_STORE", str(tmp_path / "store"))
    config_file = tmp_path / "matrix.yaml"
    config_file.write_text(yaml.safe_dump({
        "matrix_id": "t", "baseline": "bm25", "out": str(tmp_path / "out"),
        "models": ["bm25", {"name": "minilm", "model": "minilm", "dtype": "float32"}],
        "datasets": [dataset("medline")]}))
    records, markdown = evaluate.run(evaluate.cfg.parse(evaluate.MatrixConfig,
                                                        ["--config", str(config_file)], "t"))
    assert [r.reused for r in records] == [False, False]
    for record in records:
        reference = single.run(evaluate.cfg.build(single.EvalConfig, dict(
            dataset=dataset("medline"), model="minilm" if record.model == "minilm" else "bm25",
            dtype="float32", out=str(tmp_path / "single" / record.model))))
        for key in ("ndcg@10", "mrr@10", "recall@100", "recall@1000"):
            assert record.metrics[key] == pytest.approx(reference[key], abs=1e-4), key
    out = tmp_path / "out"
    assert "| medline |" in (out / "report.md").read_text()
    assert (out / "ndcg.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (out / "report.html").read_text()
    provenance = json.loads((out / "minilm" / "medline" / "provenance.json").read_text())
    assert provenance["model_hash"] and provenance["dataset_hash"]
    assert provenance["throughput"]["docs"] == 1033
    again, _ = evaluate.run(evaluate.cfg.parse(evaluate.MatrixConfig,
                                               ["--config", str(config_file)], "t"))
    assert [r.reused for r in again] == [True, True]
    assert [r.metrics["ndcg@10"] for r in again] == [r.metrics["ndcg@10"] for r in records]


def test_matrix_entries_are_validated():
    assert ModelSpec.parse("minilm").name == "minilm"
    spec = ModelSpec.parse({"name": "zs", "model": "smollm2-135m", "prompt": "one-word"})
    assert spec.encoder_options() == {"prompt": "one-word"}
    with pytest.raises(ValueError, match="unknown option"):
        ModelSpec.parse({"model": "minilm", "colour": "red"})
    with pytest.raises(ValueError, match="expected a path"):
        DatasetSpec.parse({"split": "test"})
