"""Submit a job module to a Ray cluster with Ray's ``JobSubmissionClient`` and follow it.

In: a job module (``jobs.NAME``) with its arguments, and where/how to run it; out: a
:class:`Submission` (address, entrypoint, submission id, runtime env) and, once submitted and
followed, the job's exit code -- 0 if it SUCCEEDED, 1 if it FAILED or was STOPPED, 124 when
the timeout stopped it, 130 when the user detached with Ctrl-C (the job keeps running).

* Address: explicit, else ``$RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``$RAY_ADDRESS``,
  else the local cluster recorded in the state file (:mod:`retriever.ops.cluster`), else
  http://127.0.0.1:8265.
* Local or remote: a cluster is local when its address names this machine AND all its ALIVE
  nodes' IPs are this machine's (a remote head forwarded to 127.0.0.1 is remote).
* Runtime env: the working dir (the repository) without :data:`DEFAULT_EXCLUDES` and files
  above a size limit; for remote clusters (or ``pip=True``) the ``pip`` list and ``env_vars`` of
  ``cluster/runtime_env.yaml``; local clusters reuse this Python and get ``RETRIEVER_STORE`` as
  an absolute path.
* Token auth: the ``Authorization`` header of :func:`retriever.ops.cluster.auth_headers` is
  sent to local clusters only; remote ones use Ray's own ``RAY_AUTH_*`` settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import ipaddress
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import httpx

from retriever.ops import cluster
from retriever.ops.credentials import refuse_credentials

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNTIME_ENV = REPO_ROOT / "cluster" / "runtime_env.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_EXCLUDES = [
    ".venv", ".venv/**", "venv", ".git", ".git/**", ".retriever", ".retriever/**",
    "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info",
    "build", "dist", ".ci", "*.faiss", "*.safetensors", "*.gguf",
]
SKIP_DIRS = {".venv", "venv", ".git", ".retriever", "__pycache__", ".pytest_cache",
             ".mypy_cache", ".ruff_cache", "node_modules", "build", "dist"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_TIMEOUT = 124
EXIT_DETACHED = 130


# --------------------------------------------------------------------------- address


def resolve_address(explicit: str | None, state_path: str | None = None) -> str:
    """The Job API URL, by the precedence in the module docstring."""
    if explicit:
        return explicit if "://" in explicit else f"http://{explicit}"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    state = cluster.load_state(state_path)
    return state.dashboard_url if state is not None else DEFAULT_ADDRESS


def own_addresses() -> set[str]:
    """IP addresses of this machine's interfaces (and its hostname's)."""
    out = {"127.0.0.1", "::1"}
    try:
        import psutil  # a Ray dependency

        for addrs in psutil.net_if_addrs().values():
            out.update(a.address.split("%")[0] for a in addrs
                       if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # noqa: BLE001
        pass
    try:
        out.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return out


def is_local_address(address: str) -> bool:
    """Whether the address names this machine (loopback, its hostname or one of its IPs)."""
    host = httpx.URL(address if "://" in address else f"http://{address}").host
    if host in ("localhost", "", socket.gethostname()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or host in own_addresses()


def _node_ips(address: str) -> list[str] | None:
    """IPs of the cluster's ALIVE nodes (state API), or None if it cannot be asked."""
    try:
        response = httpx.get(f"{address.rstrip('/')}/api/v0/nodes", params={"limit": 1000},
                             headers=cluster.auth_headers(), timeout=5)
        response.raise_for_status()
        rows = response.json()["data"]["result"]["result"]
    except Exception:  # noqa: BLE001 - any failure means "cannot ask"
        return None
    return [r["node_ip"] for r in rows if r.get("state") == "ALIVE" and r.get("node_ip")]


def cluster_is_local(address: str) -> bool:
    """True when the cluster behind ``address`` runs on this machine.

    A loopback address is not enough: ``ray dashboard cluster/aws.yaml`` forwards a remote
    head to 127.0.0.1:8265. So the cluster is asked for its nodes' IPs; it is local only if
    they are all this machine's. If it cannot be asked, the address alone decides.
    """
    if not is_local_address(address):
        return False
    ips = _node_ips(address)
    if not ips:
        return True
    own = own_addresses()
    return all(ip in own for ip in ips)


# --------------------------------------------------------------------------- runtime env


def large_files(root: Path, max_bytes: int, excludes: list[str]) -> list[str]:
    """Repo-relative paths (gitignore style, anchored with '/') of files above ``max_bytes``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in excludes):
                continue
            try:
                if path.stat().st_size > max_bytes:
                    out.append("/" + rel)
            except OSError:
                continue
    return sorted(out)


def load_runtime_env_file(path: Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime env YAML must be a mapping")
    return data


def _base_runtime_env(use_pip: bool, runtime_env_file: Path | None) -> dict[str, Any]:
    source = runtime_env_file or (DEFAULT_RUNTIME_ENV if use_pip else None)
    base: dict[str, Any] = {}
    if source is not None and Path(source).exists():
        base = load_runtime_env_file(Path(source))
    elif runtime_env_file is not None:
        raise FileNotFoundError(runtime_env_file)
    if not use_pip:
        for key in ("pip", "uv", "conda"):
            base.pop(key, None)
    return base


def _env_vars(base: dict[str, Any], local: bool, env: dict[str, str]) -> dict[str, str]:
    env_vars = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    store = os.environ.get("RETRIEVER_STORE")
    if local:
        from retriever.io.store import default_root

        env_vars.setdefault("RETRIEVER_STORE", default_root())
    elif store and "://" in store:
        env_vars.setdefault("RETRIEVER_STORE", store)
    env_vars.update(env)
    refuse_credentials(env_vars, "the job's runtime_env (--env / runtime env file)")
    return env_vars


def build_runtime_env(*, working_dir: Path, local: bool, pip: bool | None,
                      runtime_env_file: Path | None, env: dict[str, str],
                      extra_excludes: list[str], max_file_mb: float,
                      python: str | None) -> dict[str, Any]:
    """The job's runtime env: working dir and excludes, pip list (if any), env vars."""
    use_pip = (not local) if pip is None else pip
    base = _base_runtime_env(use_pip, runtime_env_file)
    excludes = list(dict.fromkeys(DEFAULT_EXCLUDES + list(base.get("excludes", []))
                                  + list(extra_excludes)))
    excludes += [p for p in large_files(working_dir, int(max_file_mb * 2**20), excludes)
                 if p not in excludes]
    runtime_env: dict[str, Any] = {**base, "working_dir": str(working_dir), "excludes": excludes}
    env_vars = _env_vars(base, local, env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if python:
        runtime_env["py_executable"] = python
    return runtime_env


def build_entrypoint(module: str, args: list[str], python: str) -> str:
    return " ".join(shlex.quote(x) for x in [python, "-m", module, *args])


# --------------------------------------------------------------------------- submission


@dataclasses.dataclass
class Submission:
    """Everything sent to the Job API; ``to_dict()`` is what ``--dry-run`` prints."""

    address: str
    local: bool
    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any]
    module: str

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "local": self.local, "entrypoint": self.entrypoint,
                "submission_id": self.submission_id, "runtime_env": self.runtime_env}

    @property
    def remote_without_store_url(self) -> bool:
        """A remote job whose default store would be a folder in its temporary working dir."""
        store = self.runtime_env.get("env_vars", {}).get("RETRIEVER_STORE", "")
        return not self.local and "://" not in store


def plan(module: str, args: list[str], *, address: str, local: bool | None = None,
         pip: bool | None = None, python: str | None = None, working_dir: Path = REPO_ROOT,
         runtime_env_file: Path | None = None, env: dict[str, str] | None = None,
         extra_excludes: list[str] | None = None, max_file_mb: float = 20.0,
         submission_id: str | None = None) -> Submission:
    """Decide local/remote (detected when ``local`` is None), the interpreter and runtime env."""
    local = cluster_is_local(address) if local is None else local
    use_pip = (not local) if pip is None else pip
    interpreter = python or (sys.executable if local and not use_pip else "python")
    runtime_env = build_runtime_env(
        working_dir=working_dir, local=local, pip=pip, runtime_env_file=runtime_env_file,
        env=env or {}, extra_excludes=extra_excludes or [], max_file_mb=max_file_mb,
        python=python)
    submission_id = submission_id or (f"retriever-{module.split('.')[-1]}-"
                                      f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    return Submission(address=address, local=local, module=module,
                      entrypoint=build_entrypoint(module, args, interpreter),
                      submission_id=submission_id, runtime_env=runtime_env)


def client_for(address: str, local: bool):
    """A ``JobSubmissionClient``; our token only goes to a cluster on this machine."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=cluster.auth_headers() if local else None)


def submit(client, submission: Submission, *, num_cpus: float | None = None,
           num_gpus: float | None = None, memory: int | None = None,
           resources: dict[str, float] | None = None) -> str:
    """Submit; return the job's submission id. ``num_*``/``memory``/``resources`` are the driver's."""
    return client.submit_job(
        entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
        submission_id=submission.submission_id,
        metadata={"retriever_job": submission.module, "submitted_from": socket.gethostname()},
        entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus, entrypoint_memory=memory,
        entrypoint_resources=resources)


# --------------------------------------------------------------------------- follow


async def _stream_logs(client, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client, job_id: str, timeout: float | None, follow: bool = True,
                 out: TextIO | None = None) -> str:
    """Stream logs (if ``follow``) until the job ends; return its final status name.

    Raises TimeoutError once ``timeout`` seconds have passed.
    """
    out = out or sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    if follow:
        try:
            remaining = None if deadline is None else max(1.0, deadline - time.monotonic())
            asyncio.run(asyncio.wait_for(_stream_logs(client, job_id, out), remaining))
        except asyncio.TimeoutError:
            raise TimeoutError(job_id) from None
        except Exception as exc:  # noqa: BLE001 - the log stream may drop; status decides
            print(f"\n[retriever submit] log stream ended early: {exc}", file=sys.stderr)
    while True:
        raw = client.get_job_status(job_id)
        status = str(getattr(raw, "value", raw))
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(job_id)
        time.sleep(1.0)


def follow(client, job_id: str, address: str, timeout: float | None) -> int:
    """Stream the job's logs to stdout until it ends; return its exit code (see above)."""
    try:
        status = wait_for_job(client, job_id, timeout)
    except TimeoutError:
        print(f"[retriever submit] timed out after {timeout}s; stopping {job_id}",
              file=sys.stderr)
        client.stop_job(job_id)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        print(f"\n[retriever submit] detached; {job_id} keeps running. Stop it with:\n"
              f"  ray job stop --address {address} {job_id}", file=sys.stderr)
        return EXIT_DETACHED
    info = client.get_job_info(job_id)
    message = f" ({info.message})" if getattr(info, "message", None) else ""
    print(f"[retriever submit] {job_id} {status}{message}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1
