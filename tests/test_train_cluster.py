"""Training on a real 2-node Ray cluster: a head and a second node started with `ray start` on
127.0.0.1 (one CPU each, by ``retriever.ops.cluster``), one worker per node (STRICT_SPREAD), driven
like a user would: ``retriever train --config FILE`` with ``RAY_ADDRESS`` pointing at the
cluster. The cluster runs with Ray's token authentication, so the driver gets
``RAY_AUTH_MODE=token`` (as `retriever cluster up` tells users to set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retriever.ops import cluster as lc
from tests.train_fixtures import examples_file, tiny_bert

REPO = Path(__file__).resolve().parents[1]


def _env(cluster: lc.LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": cluster.auth,
                "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)})
    return env


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """``(cluster, node ids)``: a head and a worker node; teardown stops exactly them."""
    state = tmp_path_factory.mktemp("cluster") / "state.json"
    cluster = lc.up(lc.LocalClusterConfig(workers=1, head_cpus=1, worker_cpus=1,
                                          object_store_memory=200 * 2**20,
                                          state_path=str(state), timeout_s=240))
    try:
        node_ids = sorted(n["node_id"] for n in lc.alive_nodes(cluster.dashboard_url))
        assert len(node_ids) == 2
        yield cluster, node_ids
    finally:
        lc.down(str(state))


def test_strict_spread_puts_one_worker_on_each_node(two_nodes, tmp_path):
    import yaml

    cluster, node_ids = two_nodes
    out = tmp_path / "run"
    config = {
        "train_data": str(examples_file(tmp_path / "examples.jsonl", n=32)),
        "model": str(tiny_bert(tmp_path / "tiny-bert")), "out": str(out),
        "strategy": "zero3", "num_workers": 2, "cpus_per_worker": 1,
        "placement_strategy": "STRICT_SPREAD", "max_steps": 4, "per_device_batch_size": 2,
        "group_size": 4, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "gradient_checkpointing": False, "checkpoint_every": 2, "max_failures": 0,
        "zero3_persistence_threshold": 0}
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(config_file)],
                         env=_env(cluster), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    workers = manifest["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert sorted(w["node_id"] for w in workers) == node_ids  # one worker on each node
    assert manifest["partition"]["params_materialized"] == [0, 0]  # ZeRO-3 across the nodes
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "retriever.json").exists()
