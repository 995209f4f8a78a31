"""Training on a real 2-node Ray cluster: a head and a second node started with `ray start` on
127.0.0.1 (one CPU each), one worker per node (STRICT_SPREAD), driven like a user would:
``retriever train --config FILE`` with ``RAY_ADDRESS`` pointing at the cluster.

The nodes are started here with `ray start` directly (``retriever.cluster`` waits on the
dashboard's HTTP API, which answers 401 where Ray token authentication is on). Ray enables token
auth for `ray start` when ``~/.ray/auth_token`` exists but never for a driver given an explicit
address, so nodes and drivers all get ``RAY_AUTH_MODE=token`` (the head creates a token if none
exists); the drivers run as subprocesses so this process's Ray state does not matter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.train_fixtures import examples_file, tiny_bert

REPO = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _session_members(leader: int) -> list[int]:
    """Live pids in the session led by ``leader`` (a `ray start --block` started here)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[3]) == leader:
                pids.append(int(entry))
    return pids


def _env(address: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(REPO)})
    if address:
        env["RAY_ADDRESS"] = address
    return env


def _start_node(args: list[str], log: Path) -> subprocess.Popen:
    ray_cli = str(Path(sys.executable).parent / "ray")
    with open(log, "ab") as handle:
        return subprocess.Popen([ray_cli, "start", "--block", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
                                 "--object-store-memory", str(200 * 2**20), *args],
                                stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=_env())


WAIT_FOR_NODES = """
import json, sys, time, ray
deadline = time.monotonic() + float(sys.argv[1])
while True:  # the GCS may not answer yet
    try:
        ray.init(log_to_driver=False)
        break
    except Exception:
        ray.shutdown()
        if time.monotonic() > deadline:
            raise
        time.sleep(2)
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(1)
print(json.dumps(sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])))
"""


@pytest.fixture(scope="module")
def two_nodes():
    """``(address, node ids)`` of a head and a worker node, every port free-picked, a private
    temp dir; teardown stops exactly the process sessions started here (never `ray stop`)."""
    temp_dir = tempfile.mkdtemp(prefix="rtrain-", dir="/tmp")  # short: socket paths <= 107 B
    gcs, client, *agents = _free_ports(8)
    address = f"127.0.0.1:{gcs}"
    nodes = []
    try:
        nodes.append(_start_node(
            ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
             "--include-dashboard", "false", "--temp-dir", temp_dir,
             "--dashboard-agent-listen-port", str(agents[0]),
             "--dashboard-agent-grpc-port", str(agents[1]),
             "--metrics-export-port", str(agents[2])], Path(temp_dir, "head.log")))
        nodes.append(_start_node(
            ["--address", address, "--temp-dir", temp_dir,
             "--dashboard-agent-listen-port", str(agents[3]),
             "--dashboard-agent-grpc-port", str(agents[4]),
             "--metrics-export-port", str(agents[5])], Path(temp_dir, "worker.log")))
        probe = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, "180"], env=_env(address),
                               capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr[-3000:]
        node_ids = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(node_ids) == 2, (node_ids, Path(temp_dir, "worker.log").read_text()[-2000:])
        yield address, node_ids
    finally:
        for proc in reversed(nodes):  # worker first, then head: graceful first
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(nodes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for pid in _session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_strict_spread_puts_one_worker_on_each_node(two_nodes, tmp_path):
    import yaml

    address, node_ids = two_nodes
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
                         env=_env(address), cwd=REPO, capture_output=True, text=True,
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
