"""Faults to survive on a real 2-node cluster: a whole worker NODE is lost mid-job.

One local cluster (``retriever.ops.cluster``: a head and ``worker_0``, one CPU each, on
127.0.0.1) per test. Each job runs as a user runs it -- ``python -m jobs.<job>`` with
``RAY_ADDRESS`` at the cluster, so its driver attaches to the head -- and once the job has
made progress on both nodes, :func:`retriever.ops.cluster.stop_node` SIGKILLs every process of
the worker node at once (``ray start``, raylet, object store, agents, Ray workers): the node
is gone as a crashed machine is. The job must then finish on the head alone:

* encode: every doc id exactly once across the parquet parts, the manifest's counts match;
* train: the worker group restarts from the last checkpoint on the head (steps continue).

A fresh cluster per test: the second test must not start with a lost node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retriever.io import embeddings
from retriever.ops import cluster as lc
from tests.train_fixtures import WORDS, examples_file, tiny_bert

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(tiny_bert(tmp_path_factory.mktemp("model") / "tiny-bert"))


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A head and one worker node, one CPU each; teardown stops whatever is left of them.

    The GCS declares a node dead after 5 failed health checks; one a second (Ray's default
    is one every 3 s) lets a lost node's work move on sooner. The nodes get it from this
    environment (``ray start`` inherits it); a dead raylet fails its checks at once."""
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "5")
    state = tmp_path / "cluster-state.json"
    cluster = lc.up(lc.LocalClusterConfig(workers=1, head_cpus=1, worker_cpus=1,
                                          object_store_memory=150 * 2**20,
                                          state_path=str(state), timeout_s=240))
    try:
        assert len(lc.alive_nodes(cluster.dashboard_url)) == 2
        yield cluster
    finally:
        lc.down(str(state), grace_s=5)
        leftovers = lc._stragglers(cluster.temp_dir, cluster.ports.get("gcs"))
        assert not leftovers, f"processes of the local cluster survived `down`: {leftovers}"


def _env(cluster: lc.LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": cluster.auth,
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    return env


def _run_job(cluster, args: list[str], log: Path, kill_when) -> tuple[int, dict]:
    """Run ``python -m jobs.<...> args`` against ``cluster``; stop ``worker_0`` as soon as
    ``kill_when()`` returns something true (it is returned, with the pids killed)."""
    killed: dict = {}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], env=_env(cluster), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                if not killed:
                    seen = kill_when()
                    if seen:
                        killed.update(seen=seen, pids=lc.stop_node("worker_0",
                                                                   cluster.state_path))
                time.sleep(0.05)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S}s after the node was "
                        f"stopped ({killed}):\n{log.read_text()[-4000:]}")
    return rc, killed


def _only_the_head_left(cluster) -> bool:
    """Whether the GCS has declared the stopped node dead (within 30 s), the head alive."""
    deadline = time.monotonic() + 30
    while (alive := lc.alive_nodes(cluster.dashboard_url)) and len(alive) > 1 \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    return [n["is_head"] for n in alive] == [True]


def _records(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.json")) if folder.exists() else []


def test_encode_survives_losing_the_worker_node(two_nodes, model, tmp_path):
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus.jsonl"
    ids = [f"doc-{i}" for i in range(2400)]
    corpus.write_text("".join(json.dumps({"_id": d, "title": "", "text": " ".join(
        WORDS[(i * 7 + k) % len(WORDS)] for k in range(6))}) + "\n" for i, d in enumerate(ids)))
    out = tmp_path / "emb"
    shards = 2400 // 40
    rc, killed = _run_job(
        two_nodes, ["jobs.encode", "--corpus", str(corpus), "--out", str(out),
                    "--model", model, "--docs-per-shard", "40", "--actors", "2",
                    "--passage-max-length", "16"],
        tmp_path / "encode.log", lambda: len(_records(out)) >= 2 and len(_records(out)))
    log = (tmp_path / "encode.log").read_text()
    assert killed, f"the job ended before the node could be stopped:\n{log[-3000:]}"
    assert killed["seen"] < shards  # stopped while most shards were still to do
    assert rc == 0, log[-4000:]
    assert _only_the_head_left(two_nodes)  # finished on the head alone

    manifest = embeddings.read_manifest(str(out))
    assert manifest["rows"] == len(ids) and len(manifest["parts"]) == shards
    assert manifest["source"]["input_rows"] == len(ids)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == shards
    written = [d for p in parts for d in pq.read_table(p, columns=["doc_id"])["doc_id"]
               .to_pylist()]
    assert len(written) == len(set(written)) == len(ids)  # nothing duplicated, nothing lost
    assert set(written) == set(ids)
    assert sum(p["rows"] for p in manifest["parts"]) == len(ids)
    loaded, vectors = embeddings.load(str(out), verify=True)
    assert sorted(loaded) == sorted(ids) and vectors.shape[0] == len(ids)


def _first_checkpoint_on_two_nodes(out: Path) -> dict | None:
    """Step and worker nodes of the checkpoint Ray Train has registered (its snapshot names
    it: a checkpoint whose report did not reach the controller is not one), once there is
    one from a worker group on two nodes."""
    snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        metrics = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
        nodes = sorted({w["node_id"] for w in metrics["workers"]})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"step": metrics["step"], "nodes": nodes} if len(nodes) == 2 else None


def test_training_resumes_on_the_head_after_losing_the_worker_node(two_nodes, model,
                                                                     tmp_path):
    import yaml

    out = tmp_path / "run"
    steps = 20
    config = {
        "train_data": str(examples_file(tmp_path / "examples.jsonl", n=48)), "model": model,
        "out": str(out), "strategy": "ddp", "num_workers": 2, "cpus_per_worker": 0.4,
        "placement_strategy": "SPREAD", "max_steps": steps, "per_device_batch_size": 2,
        "group_size": 4, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "gradient_checkpointing": False, "checkpoint_every": 1, "max_failures": 2,
        "schedule": "constant", "warmup_ratio": 0.0}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    rc, killed = _run_job(two_nodes, ["jobs.train", "--config", str(config_file)],
                          tmp_path / "train.log", lambda: _first_checkpoint_on_two_nodes(out))
    log = (tmp_path / "train.log").read_text()
    assert killed, f"the run ended before a checkpoint from both nodes:\n{log[-3000:]}"
    assert rc == 0, log[-4000:]
    assert _only_the_head_left(two_nodes)

    manifest = json.loads((out / "manifest.json").read_text())
    resumes = [r["from_step"] for r in manifest["resumes"]]
    assert len(resumes) >= 1 and resumes[0] >= killed["seen"]["step"] and 0 < resumes[0] < steps
    head = next(n["node_id"] for n in lc.alive_nodes(two_nodes.dashboard_url))
    assert head in killed["seen"]["nodes"]  # the first group ran on both nodes
    assert {w["node_id"] for w in manifest["workers"]} == {head}  # the new group: head only
    history = [json.loads(line)["step"]
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history == list(range(1, steps + 1))  # continued, each step once: not from 0
