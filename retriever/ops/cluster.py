"""A local multi-node Ray cluster for development and tests: one head and N workers.

Each node is a ``ray start --block`` process started in a session of its own, so every Ray
process of that node -- GCS, raylet, dashboard, agents, and the workers, which Ray moves into
process groups of their own -- shares that session id. :func:`up` records the pid and start
time of each node's leader and the ports in a small JSON state file; :func:`down` reads it
back and stops exactly those sessions (SIGTERM to the ``ray start`` leaders, which shut their
node down, then SIGKILL to whatever is left of the sessions after a grace period), then kills
stragglers that left the sessions (job drivers run in new sessions) but name this cluster's
private temp dir or GCS port. It never runs ``ray stop`` (which stops every Ray on the machine).

Isolation from other Ray users on the same machine (tests calling ``ray.init()``):

* a private ``--temp-dir`` (short, under ``/tmp``: Unix socket paths are limited to 107 bytes),
  so ``ray.init()`` elsewhere neither finds nor joins this cluster;
* every fixed default port is replaced by a free one (GCS, dashboard, Ray client server,
  dashboard agent);
* the dashboard / Job API listens on 127.0.0.1 and, on Ray versions that have it, token
  authentication is on (``RAY_AUTH_MODE=token``; the token is Ray's own, ``~/.ray/auth_token``,
  generated if missing), so only this user can submit jobs. Clients send it with
  :func:`auth_headers`; set ``RAY_AUTH_MODE=disabled`` before ``up`` to opt out. Note that ``ray start`` rewrites a loopback
  ``--node-ip-address`` to the machine's routable address and Ray's gRPC servers (GCS, raylet,
  object manager) bind all interfaces; Ray 2.x has no option to confine them to loopback.

Starting on a loaded machine: Ray's start-up waits are sized for an idle machine, and a node's
processes share its session, so Linux's per-session CPU share (autogroup) gives the whole node
one share next to each busy session of other users. Waits Ray lets us size are raised in every
node's environment (:data:`START_WAITS`; `ray start`, the raylet, the autoscaler's fake nodes
and job drivers read them). One is fixed: a new raylet waits 15 s for its dashboard agent (a
Python process, slow to import on a busy machine) to write its port files, then aborts ("Timed
out waiting for file .../metrics_agent_port_<node id>"; ``RAY_agent_register_timeout_ms`` does
not change it in Ray 2.60, checked); the node never registers and `ray start` gives up after
``RAY_raylet_start_wait_time_s`` (30 s). :func:`up` watches the raylet logs for that abort,
stops the attempt at once (no Ray process of it left) and starts afresh, up to
``start_attempts`` times, which rides out a load spike but not a lasting overload; the last
failure names the node, what its raylet waited for, the load average and the log folder.

Placement: every node advertises custom resources -- the head ``{"head": 1}``, worker *i*
``{"worker": 1, "worker_<i>": 1}`` -- so a job or task can be pinned with e.g.
``entrypoint_resources={"worker_0": 0.01}`` (fractional amounts let many share a node).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from retriever.ops import autoscale

HOST = "127.0.0.1"


def default_state_path() -> Path:
    """``$RETRIEVER_CLUSTER_STATE`` or ``$XDG_STATE_HOME/retriever/local-cluster.json``."""
    env = os.environ.get("RETRIEVER_CLUSTER_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "retriever" / "local-cluster.json"


@dataclass
class LocalClusterConfig:
    workers: int = 1
    head_cpus: int = 1
    worker_cpus: int = 1
    worker_gpus: int = 0
    head_resources: dict[str, float] = field(default_factory=dict)  # added to {"head": 1}
    worker_resources: dict[str, float] = field(default_factory=dict)  # added to each worker
    object_store_memory: int = 256 * 2**20  # per node; Ray's default (30% of RAM) is too greedy
    temp_dir: str | None = None  # default: a fresh /tmp/rtc-<hex>
    state_path: str | None = None  # default: default_state_path()
    timeout_s: float = 120.0
    # A launcher YAML (cluster/aws.yaml): no fixed workers; Ray's autoscaler launches fake
    # nodes of its groups on demand (retriever.ops.autoscale). The head then takes no work.
    autoscale_from: str | None = None
    fake_nodes: autoscale.FakeNodeSizes = field(default_factory=autoscale.FakeNodeSizes)
    autoscaler_update_s: float = 1.0  # how often the autoscaler looks (Ray's default: 5)
    start_attempts: int = 3  # fresh starts after a node failed Ray's fixed start-up waits


@dataclass
class NodeProcess:
    role: str  # "head" or "worker_<i>"
    pid: int
    pgid: int
    create_time: float  # to tell our process from a later one that reuses the pid
    resources: dict[str, float]
    log: str


@dataclass
class LocalCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    state_path: str
    nodes: list[NodeProcess]
    ports: dict[str, int]
    created: float = field(default_factory=time.time)
    python: str = sys.executable
    auth: str = "disabled"  # "token" when the nodes were started with RAY_AUTH_MODE=token
    autoscaling_config: str | None = None  # the autoscaler's config file, when autoscaling

    @property
    def address(self) -> str:
        """The Job Submission address (``http://127.0.0.1:PORT``)."""
        return self.dashboard_url

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LocalCluster":
        nodes = [NodeProcess(**n) for n in data.pop("nodes")]
        return cls(nodes=nodes, **data)


class ClusterError(RuntimeError):
    pass


class NodeStartFailed(ClusterError):
    """A node's start failed (its `ray start` exited, or its raylet aborted): worth a retry."""


# Ray's start-up waits that a loaded machine overruns, given room (Ray 2.60's defaults in
# brackets); a value already in the environment wins. RAY_raylet_start_wait_time_s (how long
# `ray start` and a fake-node launch wait for the raylet to register, 30 s) is left alone: a
# raylet registers right after its fixed 15 s agent wait or aborts, so a longer value only
# makes the autoscaler's fake-node launches wait longer for a raylet that is gone.
START_WAITS = {
    # a node or driver connecting to the GCS [20 tries, ~1 s apart]
    "RAY_gcs_server_port_wait_time_s": "60",
    # the dashboard waiting for each of its module processes (the Job API's among them) to
    # import and start [30 s]; nine start at once, with the head's other processes
    "RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT": "120",
}


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open while choosing so the n ports are distinct.
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_executable() -> list[str]:
    """The ``ray`` CLI of *this* interpreter's environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("ray")
    if found:
        return [found]
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _node_env() -> dict[str, str]:
    env = dict(os.environ)
    # A RAY_ADDRESS meant for something else must not redirect our `ray start`.
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key, value in START_WAITS.items():
        env.setdefault(key, value)
    # Job entrypoints run `python ...` through a shell on the cluster: make that the python of
    # this environment, which already has the project's dependencies.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _token_loader():
    try:
        from ray._raylet import AuthenticationTokenLoader  # Ray >= 2.52
    except ImportError:
        return None
    return AuthenticationTokenLoader.instance()


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header for a Ray dashboard / Job API with token auth.

    Ray's token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), or
    nothing when there is none; a cluster without token auth ignores the header.
    """
    loader = _token_loader()
    if loader is None or not loader.has_token(ignore_auth_mode=True):
        return {}
    return dict(loader.get_token_for_http_header())


def _auth_mode() -> str:
    """The auth mode for new local nodes: ``token`` unless opted out or Ray lacks it.

    Made explicit because Ray itself decides implicitly: ``ray start`` turns token auth on
    whenever a token file exists (any earlier local ``ray.init()`` writes one), and then every
    unauthenticated dashboard request is refused with 401.
    """
    loader = _token_loader()
    if loader is None or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "disabled"
    if not loader.has_token(ignore_auth_mode=True):
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )

        generate_and_save_token()
        loader.reset_cache()
    return "token"


def _http_json(url: str, timeout: float = 2.0) -> Any:
    """GET a dashboard URL with our token; HTTP errors raise ``httpx.HTTPStatusError``."""
    response = httpx.get(url, headers=auth_headers(), timeout=timeout)
    response.raise_for_status()
    return response.json()


def alive_nodes(dashboard_url: str) -> list[dict[str, Any]]:
    """ALIVE nodes from the state API, each with ``node_id``, ``ip``, ``is_head``, ``resources``."""
    data = _http_json(f"{dashboard_url}/api/v0/nodes?detail=1&limit=1000")
    rows = data.get("data", {}).get("result", {}).get("result", [])
    return [{"node_id": n.get("node_id"), "ip": n.get("node_ip"), "is_head": n.get("is_head_node"),
             "resources": n.get("resources_total", {})}
            for n in rows if n.get("state") == "ALIVE"]


def _process_create_time(pid: int) -> float | None:
    try:
        import psutil  # a Ray dependency

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001
        return None


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def _start_node(args: list[str], role: str, resources: dict[str, float], temp_dir: str,
                env: dict[str, str]) -> NodeProcess:
    log = os.path.join(temp_dir, f"{role}.start.log")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            _ray_executable() + ["start", "--block", *args],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=temp_dir,
        )
    ct = _process_create_time(proc.pid) or time.time()
    # Popen objects are dropped on purpose: the node outlives this call (and this process).
    return NodeProcess(role=role, pid=proc.pid, pgid=proc.pid, create_time=ct,
                       resources=resources, log=log)


def _is_ours(node: NodeProcess) -> bool:
    ct = _process_create_time(node.pid)
    return ct is not None and abs(ct - node.create_time) < 2.0


def _raylet_abort(session_logs: Path) -> str | None:
    """What a raylet of this session aborted on, if one has: Ray's fixed waits inside the
    raylet end in a failed check (a ``C``-level line in its log), which `ray start` only
    notices when its own, longer wait for the node runs out."""
    for log in sorted(session_logs.glob("raylet*.out")):
        with contextlib.suppress(OSError):
            for line in log.read_text(errors="replace").splitlines():
                if "Check failed" not in line:
                    continue
                waited = line.split("Timed out waiting for file ", 1)
                if len(waited) == 2:  # .../<port name>_<node id>
                    port = os.path.basename(waited[1].strip()).rsplit("_", 1)[0]
                    return (f"{log.name}: the raylet gave up waiting for its agents to write "
                            f"{port} (Ray waits a fixed 15 s for the dashboard agent, a Python "
                            "process that starts slowly on a busy machine)")
                return f"{log.name}: {line.split('Check failed: ', 1)[-1][:300]}"
    return None


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def _wait(predicate, timeout: float, what: str, nodes: list[NodeProcess],
          session_logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if not _pid_alive(node.pid):
                tail = _tail(node.log)
                # Ray's start-up timeouts are worth another attempt; a refused setting is not.
                error = NodeStartFailed if "timed out" in tail.lower() else ClusterError
                raise error(f"`ray start` for {node.role} exited while waiting for {what} "
                            f"({_load()}):\n{tail}")
        aborted = session_logs and _raylet_abort(session_logs)
        if aborted:
            raise NodeStartFailed(f"a raylet aborted while waiting for {what} ({_load()}): "
                                  f"{aborted}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.5)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what} ({_load()})")


def _pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our child (tests run up() in-process), then probe.
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Until every pid has exited (SIGKILL is asynchronous: a busy machine takes a moment to
    tear a large process down), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------- state


def load_state(state_path: str | os.PathLike | None = None) -> LocalCluster | None:
    path = Path(state_path) if state_path else default_state_path()
    if not path.exists():
        return None
    return LocalCluster.from_dict(json.loads(path.read_text()))


def _save_state(cluster: LocalCluster) -> None:
    path = Path(cluster.state_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(cluster.to_json())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- up / down


def _autoscaling_args(cfg: LocalClusterConfig, cluster: LocalCluster,
                      head_res: dict[str, float], env: dict[str, str]) -> list[str]:
    """With ``cfg.autoscale_from``: write the fake-multi-node autoscaling config into the
    temp dir, set the head's environment for it, and return the head's extra arguments."""
    if not cfg.autoscale_from:
        return []
    launcher = autoscale.load_launcher(cfg.autoscale_from)
    config = autoscale.local_config(launcher, cluster.gcs_address, head_res, cfg.fake_nodes)
    path = os.path.join(cluster.temp_dir, "autoscaling.json")
    Path(path).write_text(json.dumps(config, indent=2))
    cluster.autoscaling_config = path
    # RAY_FAKE_CLUSTER: Ray's switch for the fake provider (and the head's fixed node id);
    # job drivers inherit the head's environment, so they find the groups to check against.
    env.update({"RAY_FAKE_CLUSTER": "1", autoscale.CONFIG_ENV: path,
                "AUTOSCALER_UPDATE_INTERVAL_S": f"{cfg.autoscaler_update_s:g}"})
    return ["--autoscaling-config", path]


def up(config: LocalClusterConfig | None = None) -> LocalCluster:
    """Start a head and ``config.workers`` workers on 127.0.0.1; return once all are ALIVE.

    Refuses to start if the state file names a cluster that is still running. On any failure
    the nodes started so far are stopped again before the error propagates. A failed node
    start (:class:`NodeStartFailed`: a `ray start` exited or a raylet aborted, Ray's fixed
    start-up waits overrun on a busy machine) is tried again from scratch, up to
    ``config.start_attempts`` attempts in all; the last failure is raised.
    """
    cfg = config or LocalClusterConfig()
    if cfg.autoscale_from and cfg.workers:
        raise ClusterError("an autoscaling cluster starts with the head alone (workers=0): "
                           "its autoscaler launches the worker nodes")
    state_path = str(Path(cfg.state_path) if cfg.state_path else default_state_path())
    existing = load_state(state_path)
    if existing is not None:
        if any(_pid_alive(n.pid) and _is_ours(n) for n in existing.nodes):
            raise ClusterError(f"a local cluster is already running ({existing.dashboard_url}); "
                               f"state in {state_path}: run `retriever cluster down --local` first")
        Path(state_path).unlink(missing_ok=True)
    attempts, failed_dirs = max(1, cfg.start_attempts), []
    for attempt in range(1, attempts + 1):
        temp_dir = cfg.temp_dir or tempfile.mkdtemp(prefix="rtc-", dir="/tmp")
        try:
            cluster = _start(cfg, state_path, temp_dir)
        except NodeStartFailed as exc:
            failure = exc
            failed_dirs.append(temp_dir)
            if attempt < attempts:
                logging.getLogger(__name__).warning(
                    "local cluster: start attempt %d of %d failed, starting afresh: %s",
                    attempt, attempts, exc)
            continue
        for failed in failed_dirs if not cfg.temp_dir else []:  # logs of attempts recovered from
            shutil.rmtree(failed, ignore_errors=True)
        return cluster
    raise NodeStartFailed(f"the local cluster did not start in {attempts} attempt(s); the "
                          f"last one: {failure}") from failure


def _start(cfg: LocalClusterConfig, state_path: str, temp_dir: str) -> LocalCluster:
    """One attempt of :func:`up`; on failure nothing of it is left running."""
    os.makedirs(temp_dir, exist_ok=True)
    # The head links it to its new session: a link left by an earlier attempt must not be read.
    Path(temp_dir, "session_latest").unlink(missing_ok=True)
    logs = Path(temp_dir, "session_latest", "logs")
    gcs_port, dash_port, client_port, *agent_ports = _free_ports(3 + cfg.workers + 1)
    env = _node_env()
    env["RAY_AUTH_MODE"] = auth = _auth_mode()
    cluster = LocalCluster(
        gcs_address=f"{HOST}:{gcs_port}", dashboard_url=f"http://{HOST}:{dash_port}",
        temp_dir=temp_dir, state_path=state_path, nodes=[],
        ports={"gcs": gcs_port, "dashboard": dash_port, "ray_client": client_port},
        auth=auth,
    )
    common = ["--node-ip-address", HOST, "--temp-dir", temp_dir, "--disable-usage-stats",
              "--object-store-memory", str(int(cfg.object_store_memory))]
    try:
        head_res = {"head": 1.0, **cfg.head_resources}
        autoscaling = _autoscaling_args(cfg, cluster, head_res, env)
        cluster.nodes.append(_start_node(
            ["--head", "--port", str(gcs_port), "--dashboard-host", HOST,
             "--dashboard-port", str(dash_port), "--ray-client-server-port", str(client_port),
             "--dashboard-agent-listen-port", str(agent_ports[0]), "--include-dashboard", "true",
             "--num-cpus", str(0 if autoscaling else cfg.head_cpus), "--num-gpus", "0",
             "--resources", json.dumps(head_res), *autoscaling, *common],
            "head", head_res, temp_dir, env))
        _save_state(cluster)  # from here on `down` can clean up even if we die
        _wait(lambda: len(alive_nodes(cluster.dashboard_url)) >= 1, cfg.timeout_s,
              "the head node", cluster.nodes, logs)
        for i in range(cfg.workers):
            res = {"worker": 1.0, f"worker_{i}": 1.0, **cfg.worker_resources}
            cluster.nodes.append(_start_node(
                ["--address", cluster.gcs_address, "--num-cpus", str(cfg.worker_cpus),
                 "--num-gpus", str(cfg.worker_gpus),
                 "--dashboard-agent-listen-port", str(agent_ports[1 + i]),
                 "--resources", json.dumps(res), *common],
                f"worker_{i}", res, temp_dir, env))
            _save_state(cluster)
        _wait(lambda: len(alive_nodes(cluster.dashboard_url)) >= 1 + cfg.workers, cfg.timeout_s,
              f"{1 + cfg.workers} nodes", cluster.nodes, logs)
        _wait(lambda: _http_json(f"{cluster.dashboard_url}/api/version") is not None,
              cfg.timeout_s, "the Job API", cluster.nodes, logs)
    except BaseException as exc:
        down(state_path, grace_s=5, keep_temp=True)  # a failed start: no need to be gentle
        if isinstance(exc, ClusterError):
            raise type(exc)(f"{exc}\n(Ray's logs: {logs.resolve()})") from exc
        raise
    return cluster


def _members(leader: int) -> list[int]:
    """Live pids in the session (or process group) led by ``leader``.

    ``ray start`` was started with ``start_new_session=True``, so its session id is its pid;
    Ray moves workers into process groups of their own, but they stay in that session.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and (sid == leader or pgrp == leader):
            pids.append(int(entry))
    return pids


def _kill_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stragglers(temp_dir: str, gcs_port: int | None = None) -> list[int]:
    """Processes that belong to this cluster but left its process groups.

    Ray workers get process groups of their own and job drivers run in new sessions; they are
    recognised by this cluster's private temp dir on their command line or in their
    environment, or by a ``RAY_ADDRESS`` pointing at this cluster's GCS port.
    """
    out = []
    base = temp_dir.rstrip("/").encode()
    marker = base + b"/"
    port_suffix = f":{gcs_port}".encode() if gcs_port else None
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
        except OSError:
            continue
        flat = cmd.replace(b"\0", b" ") + b" "
        hit = marker in flat or base + b" " in flat
        for var in environ:
            if hit:
                break
            if marker in var:
                hit = True
            elif port_suffix and var.startswith(b"RAY_ADDRESS=") and var.endswith(port_suffix):
                hit = True
        if hit:
            out.append(int(entry))
    return out


def down(state_path: str | os.PathLike | None = None, grace_s: float = 15.0,
         keep_temp: bool = False) -> list[int]:
    """Stop the cluster recorded in ``state_path``; return the node leader pids signalled.

    Workers go first, then the head. Each node's ``ray start --block`` leader gets SIGTERM
    (it shuts its node down in order); after ``grace_s`` whatever is left of the node's
    session gets SIGKILL. Stragglers that left the group but still name our temp dir
    are killed last. The state file is removed; the temp dir (logs) too unless ``keep_temp``.
    """
    path = Path(state_path) if state_path else default_state_path()
    cluster = load_state(path)
    if cluster is None:
        return []
    ordered = [n for n in cluster.nodes if n.role != "head"] + \
              [n for n in cluster.nodes if n.role == "head"]
    signalled: list[int] = []
    for node in ordered:
        if _is_ours(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGTERM)  # graceful: the leader stops its node
            signalled.append(node.pid)
        elif _members(node.pid):
            signalled.append(node.pid)  # leader gone, its processes not
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_members(leader) for leader in signalled):
        time.sleep(0.25)
    killed = [pid for leader in signalled for pid in _members(leader)]
    if cluster.temp_dir and len(cluster.temp_dir) > 5:
        killed += _stragglers(cluster.temp_dir, cluster.ports.get("gcs"))
    _kill_all(killed, signal.SIGKILL)
    _wait_gone(killed, timeout=10.0)
    # Reap our own children (when up() ran in this process) so no zombies linger.
    for node in ordered:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(node.pid, os.WNOHANG)
    path.unlink(missing_ok=True)
    if not keep_temp and cluster.temp_dir and os.path.basename(cluster.temp_dir).startswith("rtc-"):
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return signalled


def status(state_path: str | os.PathLike | None = None) -> dict[str, Any]:
    cluster = load_state(state_path)
    if cluster is None:
        return {"running": False}
    info: dict[str, Any] = {
        "running": any(_pid_alive(n.pid) and _is_ours(n) for n in cluster.nodes),
        "dashboard_url": cluster.dashboard_url, "gcs_address": cluster.gcs_address,
        "temp_dir": cluster.temp_dir,
        "nodes": [{"role": n.role, "pid": n.pid, "alive": _pid_alive(n.pid) and _is_ours(n),
                   "resources": n.resources} for n in cluster.nodes],
    }
    with contextlib.suppress(Exception):
        alive = alive_nodes(cluster.dashboard_url)
        info["alive_nodes"] = len(alive)
        if cluster.autoscaling_config:
            config = json.loads(Path(cluster.autoscaling_config).read_text())
            info["autoscaling_config"] = cluster.autoscaling_config
            info["groups"] = autoscale.census(alive, config)
    return info


def stop_node(role: str, state_path: str | os.PathLike | None = None,
              sig: int = signal.SIGKILL) -> list[int]:
    """Stop ONE node (``"worker_0"``, ...) of the cluster in ``state_path``, the rest running.

    ``sig`` goes to every process of the node's session at once -- the ``ray start`` leader,
    its raylet, object store, agents and the Ray workers on it -- so with SIGKILL (the
    default) the node is lost as a crashed machine would be, without a goodbye to the GCS.
    Returns the pids signalled. The node stays in the state file: :func:`down` skips it.
    """
    cluster = load_state(state_path)
    if cluster is None:
        raise ClusterError(f"no local cluster recorded in {state_path or default_state_path()}")
    node = next((n for n in cluster.nodes if n.role == role), None)
    if node is None:
        raise ClusterError(f"the local cluster has no node {role!r} "
                           f"(nodes: {', '.join(n.role for n in cluster.nodes)})")
    if _pid_alive(node.pid) and not _is_ours(node):
        return []  # the leader's pid now names another process: its session is not ours
    pids = _members(node.pid)
    _kill_all(pids, sig)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(node.pid, os.WNOHANG)
    return pids
