"""`retriever submit` and `retriever cluster up|down --local`.

The unit tests build entrypoints and runtime envs without Ray. The integration tests bring up
a real 2-node cluster on 127.0.0.1 (head + one worker, private temp dir, free ports), submit
jobs through the Job Submission API with `retriever submit`, and tear the cluster down in a
finalizer -- also when a test fails -- checking that none of its processes survive.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from jobs.cli import main as cli
from jobs.submit import job_module
from retriever.ops import cluster as lc
from retriever.ops import submit

# Ray's own job SDK opens its log websocket with a deprecated aiohttp argument.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


# --------------------------------------------------------------------------- unit


def test_job_names_map_to_modules():
    assert job_module("plan") == "jobs.plan"
    assert job_module("eval") == "jobs.eval"
    assert job_module("jobs.encode") == "jobs.encode"
    assert job_module("encode") == "jobs.encode"
    with pytest.raises(ValueError):
        job_module("submit")


def test_entrypoint_quotes_arguments():
    ep = submit.build_entrypoint("jobs.eval", ["--dataset", "/a b/c", "--out", "x;y"], "python")
    assert ep == "python -m jobs.eval --dataset '/a b/c' --out 'x;y'"


@pytest.mark.parametrize("address,local", [
    ("http://127.0.0.1:8265", True), ("http://localhost:1234", True), ("127.0.0.1:8265", True),
    ("http://10.255.255.1:8265", False), ("https://ray.example.com", False),
])
def test_local_address_detection(address, local):
    assert submit.is_local_address(address) is local


def test_forwarded_remote_head_is_not_local(monkeypatch):
    # `ray dashboard cluster/aws.yaml` forwards a remote head to 127.0.0.1:8265.
    monkeypatch.setattr(submit, "_node_ips", lambda address: ["10.1.2.3", "10.1.2.4"])
    assert submit.cluster_is_local("http://127.0.0.1:8265") is False
    monkeypatch.setattr(submit, "_node_ips", lambda address: ["127.0.0.1"])
    assert submit.cluster_is_local("http://127.0.0.1:8265") is True
    monkeypatch.setattr(submit, "_node_ips", lambda address: None)  # cannot ask: address decides
    assert submit.cluster_is_local("http://127.0.0.1:8265") is True
    assert submit.cluster_is_local("http://10.255.255.1:8265") is False


def test_address_resolution_order(monkeypatch, tmp_path):
    state = tmp_path / "none.json"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None, str(state)) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not a Job API URL
    assert submit.resolve_address(None, str(state)) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.2:8265")
    assert submit.resolve_address(None, str(state)) == "http://10.0.0.2:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.3:8265")
    assert submit.resolve_address(None, str(state)) == "http://10.0.0.3:8265"
    assert submit.resolve_address("10.0.0.4:8265", str(state)) == "http://10.0.0.4:8265"


def test_local_runtime_env_reuses_the_env_and_pins_the_store(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVER_STORE", "relative-store")
    big = tmp_path / "data" / "huge.bin2"
    big.parent.mkdir()
    with open(big, "wb") as fh:  # sparse: 30 MiB apparent size, no disk used
        fh.truncate(30 * 2**20)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "x.py").write_text("print('x')\n")
    env = submit.build_runtime_env(working_dir=tmp_path, local=True, pip=None,
                                   runtime_env_file=None, env={"A": "1"}, extra_excludes=[],
                                   max_file_mb=20, python=None)
    assert "pip" not in env
    assert env["working_dir"] == str(tmp_path)
    for pattern in (".venv", ".git", ".retriever"):
        assert pattern in env["excludes"]
    assert "/data/huge.bin2" in env["excludes"]
    assert env["env_vars"]["RETRIEVER_STORE"] == os.path.abspath("relative-store")
    assert env["env_vars"]["A"] == "1"


def test_remote_runtime_env_installs_pip_list(monkeypatch):
    monkeypatch.setenv("RETRIEVER_STORE", "s3://bucket/prefix")
    env = submit.build_runtime_env(working_dir=ROOT, local=False, pip=None, runtime_env_file=None,
                                   env={}, extra_excludes=["notes/**"], max_file_mb=20, python=None)
    assert any(p.startswith("torch") for p in env["pip"]["packages"])
    assert env["env_vars"]["RETRIEVER_STORE"] == "s3://bucket/prefix"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert "notes/**" in env["excludes"] and ".venv" in env["excludes"]


def test_dry_run_prints_the_submission(capsys, tmp_path):
    rc = cli(["submit", "--address", "http://127.0.0.1:1", "--dry-run", "--state",
              str(tmp_path / "s.json"), "plan", "--docs", "1e6"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert data["local"] is True
    assert data["entrypoint"] == f"{sys.executable} -m jobs.plan --docs 1e6"
    assert data["runtime_env"]["working_dir"] == str(ROOT)


def test_unknown_job_is_refused(capsys):
    assert cli(["submit", "--address", "http://127.0.0.1:1", "no_such_job"]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- integration


def _our_processes(temp_dir: str) -> list[int]:
    return [pid for pid in lc._stragglers(temp_dir) if lc._pid_alive(pid)]


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster") / "state.json"
    rc = cli(["cluster", "up", "--local", "--workers", "1", "--state", str(state),
              "--object-store-mb", "128", "--timeout", "180"])
    assert rc == 0, "retriever cluster up --local failed"
    cluster = lc.load_state(state)
    assert cluster is not None
    try:
        yield cluster
    finally:
        temp_dir = cluster.temp_dir
        cli(["cluster", "down", "--local", "--state", str(state)])
        lc.down(state)  # no-op if the CLI already cleaned up
        leftovers = _our_processes(temp_dir)
        assert not leftovers, f"processes of the local cluster survived `down`: {leftovers}"
        assert not state.exists()


def _submit(capsys, cluster, *args: str) -> tuple[int, str]:
    rc = cli(["submit", "--address", cluster.dashboard_url, "--timeout", "120", *args])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.timeout(420)
def test_local_cluster_has_two_nodes_on_loopback_dashboard(local_cluster):
    assert local_cluster.dashboard_url.startswith("http://127.0.0.1:")
    nodes = lc.alive_nodes(local_cluster.dashboard_url)
    assert len(nodes) == 2
    assert sum("worker_0" in n["resources"] for n in nodes) == 1
    assert sum("head" in n["resources"] for n in nodes) == 1
    info = lc.status(local_cluster.state_path)
    assert info["running"] and info["alive_nodes"] == 2


def test_local_cluster_refuses_requests_without_the_token(local_cluster):
    import urllib.error
    import urllib.request

    if local_cluster.auth != "token":
        pytest.skip("this Ray has no token authentication")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{local_cluster.dashboard_url}/api/v0/nodes", timeout=10)
    assert refused.value.code == 401


def test_submit_finds_the_local_cluster_by_its_state(monkeypatch, local_cluster):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert submit.resolve_address(None, local_cluster.state_path) == local_cluster.dashboard_url
    assert submit.cluster_is_local(local_cluster.dashboard_url) is True


@pytest.mark.timeout(420)
def test_submit_plan_job_succeeds_on_the_worker(capsys, local_cluster):
    rc, out = _submit(capsys, local_cluster, "--resources", '{"worker_0": 0.01}',
                      "--submission-id", "test-plan-job", "plan", "--docs", "1e9", "--json")
    assert rc == 0, out
    assert '"embedding_bytes": 7168000000000.0' in out  # streamed from the job's stdout
    assert "test-plan-job SUCCEEDED" in out
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(
        local_cluster.dashboard_url, headers=lc.auth_headers()).get_job_info("test-plan-job")
    worker = [n for n in lc.alive_nodes(local_cluster.dashboard_url)
              if "worker_0" in n["resources"]]
    assert info.driver_node_id == worker[0]["node_id"], "the driver ran on worker_0"


@pytest.mark.timeout(420)
def test_failing_job_gives_nonzero_exit(capsys, local_cluster):
    rc, out = _submit(capsys, local_cluster, "plan", "--docs", "1e6", "--pq-m", "61")
    assert rc == 1, out
    assert "FAILED" in out
    assert "must divide dims" in out  # the job's stderr reached us through the log stream


@pytest.mark.timeout(480)
@pytest.mark.skipif(importlib.util.find_spec("jobs.eval") is None,
                    reason="jobs/eval.py not written yet")
def test_submit_bm25_eval_of_cranfield_writes_metrics(capsys, monkeypatch, local_cluster,
                                                      tmp_path):
    dataset = DATASETS / "cranfield"
    if not dataset.exists():
        pytest.skip(f"{dataset} missing")
    store = tmp_path / "store"
    # No --out: the job writes to the default store, which `submit` forwards as an absolute
    # RETRIEVER_STORE, so the job's output lands where this process looks for it.
    monkeypatch.setenv("RETRIEVER_STORE", str(store))
    rc, out = _submit(capsys, local_cluster, "eval", "--dataset", str(dataset), "--model", "bm25")
    assert rc == 0, out
    assert "SUCCEEDED" in out
    found = list(store.rglob("metrics.json"))
    assert len(found) == 1, (found, out)
    assert found[0].relative_to(store).parts[0] == "evals"  # <store>/evals/.../metrics.json
    metrics = json.loads(found[0].read_text())
    assert metrics["dataset"] == "cranfield"
    assert metrics["counts"]["queries"] == 225
    assert (found[0].parent / "run.trec").exists()
