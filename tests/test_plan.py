"""`retriever plan`: the numbers agree with hand arithmetic, and every formula is shown."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import plan as plan_job
from jobs.cli import main as cli
from retriever.ops import capacity as cap

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def run_plan(capsys, *args: str) -> str:
    rc = cli(["plan", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def run_json(capsys, *args: str) -> dict:
    return json.loads(run_plan(capsys, *args, "--json"))["results"]


def test_fp16_embeddings_of_1e9_docs_are_7_17_tb(capsys):
    out = run_plan(capsys, "--docs", "1e9", "--model", "qwen2.5-7b", "--dims", "3584",
                   "--dtype", "fp16", "--index", "ivfpq")
    # 1e9 x 3584 x 2 bytes = 7.168e12 B
    assert "embedding_bytes = docs x dims x bytes_per_dim" in out
    assert "= 1e+09 x 3584 x 2  (fp16)" in out
    assert "= 7.168e+12 B = 7.17 TB (6.52 TiB)" in out
    assert "embeddings      7.17 TB" in out


def test_flat_shards_match_hand_arithmetic(capsys):
    r = run_json(capsys, "--docs", "1e9", "--dims", "3584", "--dtype", "fp16", "--index", "flat",
                 "--node-type", "r7i.16xlarge", "--memory-fraction", "0.6")
    per_vec = 3584 * 4                           # IndexFlat: float32 whatever the storage dtype
    capacity = 512 * GIB * 0.6                   # r7i.16xlarge: 512 GiB
    per_shard = math.floor(capacity / per_vec)   # 23,009,559 vectors
    shards = math.ceil(1e9 / per_shard)          # 44
    assert r["index_bytes_per_vector"] == per_vec
    assert r["vectors_per_shard_max"] == per_shard
    assert r["shards"] == shards == 44
    assert r["index_bytes_total"] == pytest.approx(1e9 * per_vec)
    assert r["index_bytes_per_shard"] == math.ceil(1e9 / shards) * per_vec
    assert r["index_bytes_per_shard"] <= capacity
    assert r["search_fanout"] == shards
    assert r["search_nodes"] == shards


def test_ivfpq_shards_include_the_centroid_table(capsys):
    r = run_json(capsys, "--docs", "1e9", "--dims", "3584", "--index", "ivfpq", "--pq-m", "64",
                 "--refine", "none", "--node-type", "r7i.8xlarge", "--memory-fraction", "0.5",
                 "--replicas", "2")
    nlist = 131072                                # next pow2 of 4 x sqrt(1e9) = 126,491
    # coarse centroids + list sizes + PQ codebooks (fp32)
    fixed = nlist * 3584 * 4 + nlist * 8 + 256 * 3584 * 4
    per_vec = 64 + 8                              # 64 one-byte codes + int64 id
    capacity = 256 * GIB * 0.5
    shards = math.ceil(1e9 / math.floor((capacity - fixed) / per_vec))
    assert r["nlist"] == nlist
    assert r["index_fixed_bytes_per_shard"] == fixed
    assert r["index_bytes_per_vector"] == per_vec
    assert r["shards"] == shards == 1
    assert r["search_nodes"] == 2  # shards x replicas
    # Smaller nodes force several shards, each carrying its own centroid table.
    r = run_json(capsys, "--docs", "1e9", "--dims", "3584", "--index", "ivfpq", "--pq-m", "64",
                 "--refine", "none", "--node-memory-gib", "32", "--node-price", "1",
                 "--memory-fraction", "0.5")
    capacity = 32 * GIB * 0.5
    shards = math.ceil(1e9 / math.floor((capacity - fixed) / per_vec))
    assert r["shards"] == shards == 5
    assert r["index_bytes_total"] == pytest.approx(1e9 * per_vec + shards * fixed)


def test_ivfpq_plan_includes_the_sq8_refine_codes_the_index_job_adds(capsys):
    # issue 11: at d=3584 the plan said ~72 B a vector where the index writes ~3.6 KB
    r = run_json(capsys, "--docs", "1e9", "--dims", "3584", "--index", "ivfpq", "--pq-m", "64")
    assert r["index_bytes_per_vector"] == 64 + 8 + 3584  # PQ codes + id + SQ8 re-rank codes
    assert r["index_fixed_bytes_per_shard"] == (131072 * 3584 * 4 + 131072 * 8
                                                + 256 * 3584 * 4 + 2 * 3584 * 4)


@pytest.mark.parametrize("index, per_vec", [
    ("sq8", 1024 + 2 * 1024),         # SQ8 codes + fp16 rescoring store
    ("binary", 1024 // 8 + 1024),     # sign bits + SQ8 rescoring store
    ("flat", 1024 * 4),
])
def test_compressed_types_bytes_per_vector(capsys, index, per_vec):
    r = run_json(capsys, "--docs", "1e7", "--dims", "1024", "--model", "none", "--params", "3e8",
                 "--index", index)
    assert r["index_bytes_per_vector"] == per_vec


def test_hnsw_bytes_per_vector(capsys):
    r = run_json(capsys, "--docs", "1e7", "--dims", "1024", "--model", "none", "--params", "3e8",
                 "--index", "hnsw", "--hnsw-m", "32")
    # float32 vector + 2M level-0 links + M/(M-1) upper-level links (int32) + level + offset
    assert r["index_bytes_per_vector"] == pytest.approx(1024 * 4 + 4 * (64 + 32 / 31) + 4 + 8)


def test_encode_gpu_hours_from_flops(capsys):
    out = run_plan(capsys, "--docs", "1e9", "--model", "qwen2.5-7b", "--avg-tokens", "256",
                   "--gpu", "a100", "--mfu", "0.35")
    r = run_json(capsys, "--docs", "1e9", "--model", "qwen2.5-7b", "--avg-tokens", "256",
                 "--gpu", "a100", "--mfu", "0.35")
    flops_per_token = 2 * 6.53e9 + 2 * 28 * 256 * 3584   # Kaplan et al. forward FLOPs
    docs_per_s = 312e12 * 0.35 / (flops_per_token * 256)
    gpu_hours = 1e9 / docs_per_s / 3600                    # ~8,538
    assert r["encode_gpu_hours"] == pytest.approx(gpu_hours)
    assert 8000 < gpu_hours < 9000
    assert r["encode_cost_usd"] == pytest.approx(gpu_hours * 32.7726 / 8)
    assert r["encode_wall_hours"] == pytest.approx(gpu_hours / 8)
    assert "= 2 x 6.53e+09 + 2 x 28 x 256 x 3584" in out
    assert "= 312e12 x 0.35" in out
    assert f"{gpu_hours:,.0f} GPU-hours" in out


def test_measured_throughput_overrides_the_estimate(capsys):
    r = run_json(capsys, "--docs", "1e9", "--docs-per-second", "50", "--gpu-price", "2.5",
                 "--encode-gpus", "64")
    assert "flops_per_token" not in r
    assert r["encode_gpu_hours"] == pytest.approx(1e9 / 50 / 3600)  # 5,555.6
    assert r["encode_cost_usd"] == pytest.approx(1e9 / 50 / 3600 * 2.5)
    assert r["encode_wall_hours"] == pytest.approx(1e9 / 50 / 3600 / 64)


def test_every_step_prints_formula_and_substitution(capsys):
    out = run_plan(capsys, "--docs", "2.5M", "--model", "minilm", "--index", "flat")
    result = cap.plan(cap.PlanConfig(docs=2.5e6, model="minilm", index="flat"))
    for step in result.steps:
        assert f"{step.name} = {step.formula}" in out
        assert f"    = {step.substituted}" in out
    assert "assumptions:" in out and "MFU" in out


def test_default_tables_name_their_sources():
    assert cap.MODELS and cap.GPUS and cap.NODE_TYPES
    for table in (cap.MODELS, cap.GPUS, cap.NODE_TYPES):
        for row in table.values():
            assert row.source.strip(), row
    assert cap.MODELS["qwen2.5-7b"].hidden == 3584
    assert cap.NODE_TYPES["r7i.16xlarge"].memory_gib == 512
    assert cap.NODE_TYPES["p4d.24xlarge"].gpus == 8
    assert "Kaplan" in cap.__doc__ and "datasheet" in cap.__doc__


@pytest.mark.parametrize("args", [
    ["--docs", "1e6", "--index", "ivfpq", "--pq-m", "60"],  # 60 does not divide 3584
    ["--docs", "1e6", "--model", "no-such-model"],
    ["--docs", "1e6", "--gpu", "tpu9"],
    ["--docs", "1e9", "--index", "ivfpq", "--node-memory-gib", "1", "--node-price", "1"],
])
def test_bad_inputs_exit_2(capsys, args):
    assert plan_job.main(args) == 2
    assert "retriever plan:" in capsys.readouterr().err


def test_parse_count():
    assert cap.parse_count("1e9") == 1e9
    assert cap.parse_count("8.8M") == 8.8e6
    assert cap.parse_count("1_000") == 1000
    assert cap.parse_count("2B") == 2e9


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "jobs.plan", "--docs", "1e6", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"]["embedding_bytes"] == 1e6 * 3584 * 2


def test_yaml_config_takes_counts_as_text(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    path.write_text("docs: 8.8M\nmodel: none\nparams: 300k\ndims: 1024\nindex: flat\n")
    r = run_json(capsys, "--config", str(path))
    assert r["embedding_bytes"] == 8.8e6 * 1024 * 2
    # Flags win over the file.
    assert run_json(capsys, "--config", str(path), "--docs", "1e6")["embedding_bytes"] == (
        1e6 * 1024 * 2)


@pytest.mark.parametrize("line, key", [("docs: 8.8X", "docs"), ("dtype: fp9", "dtype")])
def test_bad_yaml_value_names_its_key(tmp_path, capsys, line, key):
    path = tmp_path / "plan.yaml"
    path.write_text(("docs: 1e6\n" if key != "docs" else "") + line + "\n")
    with pytest.raises(SystemExit) as exit_:
        plan_job.main(["--config", str(path)])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.split("error:", 1)[1]  # not the usage lines
    assert key in message and line.split(": ")[1] in message


# --------------------------------------------------------------------------- calibrated on files

ROWS = 3000


@pytest.fixture(scope="module")
def clustered_embeddings(tmp_path_factory):
    from retriever.io import synthetic
    from tests.index_fixtures import write_embeddings

    folder = tmp_path_factory.mktemp("plan") / "emb"
    vectors = synthetic.clustered_vectors(ROWS, dim=64, centres=200, seed=5)
    write_embeddings(str(folder), [f"d{i:05d}" for i in range(ROWS)], vectors,
                     {"model": "synthetic"})
    return str(folder)


@pytest.mark.parametrize("index, extra", [
    ("flat", []), ("hnsw", ["--hnsw-m", "16"]), ("ivfpq", []),
    ("ivfpq", ["--refine", "none", "--pq-m", "16", "--pq-nbits", "4"]), ("sq8", []),
    ("binary", []),
])
def test_planned_bytes_within_5_percent_of_the_index_job_files(clustered_embeddings, tmp_path,
                                                               capsys, index, extra):
    out = tmp_path / "index"
    assert cli(["index", "--embeddings", clustered_embeddings, "--shards", "2", "--type", index,
                "--recall-queries", "0", "--out", str(out), *extra]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    files = sum((out / s["index"]).stat().st_size for s in manifest["shards"])
    r = run_json(capsys, "--docs", str(ROWS), "--dims", "64", "--model", "none", "--params",
                 "1e6", "--index", index, "--train-sample", str(ROWS), *extra)
    planned = ROWS * r["index_bytes_per_vector"] + 2 * r["index_fixed_bytes_per_shard"]
    print(f"{manifest['factory']}: planned {planned / ROWS:.1f} B/vector, files "
          f"{files / ROWS:.1f} ({planned / files - 1:+.2%})")
    assert planned == pytest.approx(files, rel=0.05)
    assert manifest["bytes_per_vector"]["planned"] == pytest.approx(planned / ROWS, abs=1e-3)


def encode_manifest(folder: Path, resources: str, docs: int = 5000, seconds: float = 100.0):
    """An embedding folder's manifest as `retriever encode` writes it (its ``encode`` key)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "retriever.embeddings/1", "rows": docs, "dim": 384, "parts": [],
        "encode": {"shards": 5, "last_run": {"seconds": seconds, "shards_encoded": 5,
                                             "shards_reused": 0, "docs": docs,
                                             "docs_per_s": docs / seconds,
                                             "resources": resources}}}))
    return str(folder)


def test_from_manifest_takes_the_measured_throughput_per_gpu(tmp_path, capsys):
    url = encode_manifest(tmp_path / "emb", "4 actor(s) x (1 GPU, 1 thread(s))")
    r = run_json(capsys, "--docs", "1e9", "--from-manifest", url, "--encode-gpus", "8")
    assert r["encode_gpu_hours"] == pytest.approx(1e9 / (5000 / 100 / 4) / 3600)
    assert "flops_per_token" not in r
    out = run_plan(capsys, "--docs", "1e9", "--from-manifest", url + "/manifest.json")
    assert f"encode throughput from {url}/manifest.json: 5000 docs in 100 s" in out
    assert "= 12.5 docs/s per GPU" in out
    cpu = encode_manifest(tmp_path / "cpu", "2 actor(s) x (0.75 CPU, 1 thread(s))")
    assert run_json(capsys, "--docs", "1e6", "--from-manifest", cpu)[
        "encode_gpu_hours"] == pytest.approx(1e6 / 25 / 3600)  # per CPU actor


def test_from_manifest_without_a_measured_run_exits_2(tmp_path, capsys):
    url = encode_manifest(tmp_path / "emb", "1 actor(s) x (1 GPU, 1 thread(s))", docs=0)
    assert plan_job.main(["--docs", "1e6", "--from-manifest", url]) == 2
    assert "records no measured run" in capsys.readouterr().err
    assert plan_job.main(["--docs", "1e6", "--from-manifest", str(tmp_path / "none")]) == 2
    assert "no encode manifest there" in capsys.readouterr().err
