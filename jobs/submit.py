"""``retriever submit``: run any job on a Ray cluster through the Job Submission API.

    retriever submit [OPTIONS] JOB [JOB ARGS...]
    retriever submit eval --dataset /data/cranfield --model bm25 --out /tmp/store
    retriever submit --address http://HEAD:8265 --pip encode --corpus s3://... --out s3://...

JOB is a ``retriever`` command (``eval``, ``encode``, ``plan``...) or a module ``jobs.NAME``;
the entrypoint on the cluster is ``PYTHON -m jobs.NAME ARGS``. The repository root is uploaded
as the job's ``working_dir`` (without .venv, .git, .retriever, caches, model/index binaries
and files larger than ``--max-file-mb``). The job's logs are streamed here and the exit code is the job's:
0 only if it SUCCEEDED, 1 if it FAILED or was STOPPED, 124 on ``--timeout`` (the job is stopped).

Address: ``--address``, else ``$RAY_API_SERVER_ADDRESS``, else an ``http(s)://`` ``$RAY_ADDRESS``,
else the local cluster recorded by ``retriever cluster up --local``, else http://127.0.0.1:8265.

Environment on the cluster:

* local clusters (every node's IP is this machine's; ``--local`` / ``--remote`` override the
  detection, which matters for a remote head forwarded to 127.0.0.1) default to ``--no-pip``: the nodes already run this
  Python with every dependency, the entrypoint uses this interpreter (``sys.executable``) and
  ``RETRIEVER_STORE`` is forwarded as an absolute path so relative store paths mean the same
  thing inside the job as here;
* remote clusters default to ``--pip``: the ``pip`` list and ``env_vars`` of
  ``cluster/runtime_env.yaml`` (or ``--runtime-env FILE``) are installed into the job's
  runtime env and the entrypoint uses the cluster's ``python``.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import ipaddress
import json
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNTIME_ENV = REPO_ROOT / "cluster" / "runtime_env.yaml"
DEFAULT_EXCLUDES = [
    ".venv", ".venv/**", "venv", ".git", ".git/**", ".retriever", ".retriever/**",
    "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info",
    "build", "dist", ".ci", "*.faiss", "*.safetensors", "*.gguf",
]
SKIP_DIRS = {".venv", "venv", ".git", ".retriever", "__pycache__", ".pytest_cache",
             ".mypy_cache", ".ruff_cache", "node_modules", "build", "dist"}
NOT_SUBMITTABLE = {"submit", "cluster"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# --------------------------------------------------------------------------- address


def resolve_address(explicit: str | None, state_path: str | None = None) -> str:
    if explicit:
        return explicit if "://" in explicit else f"http://{explicit}"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value
    from retriever.ops import cluster as lc

    state = lc.load_state(state_path)
    if state is not None:
        return state.dashboard_url
    return "http://127.0.0.1:8265"


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
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", "", socket.gethostname()):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or host in own_addresses()


def _node_ips(address: str) -> list[str] | None:
    """IPs of the cluster's ALIVE nodes (state API), or None if it cannot be asked."""
    import urllib.request

    from retriever.ops.cluster import auth_headers

    request = urllib.request.Request(f"{address.rstrip('/')}/api/v0/nodes?limit=1000",
                                     headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            rows = json.loads(resp.read())["data"]["result"]["result"]
    except Exception:  # noqa: BLE001
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


def build_runtime_env(*, working_dir: Path, local: bool, pip: bool | None,
                      runtime_env_file: Path | None, env: dict[str, str],
                      extra_excludes: list[str], max_file_mb: float,
                      python: str | None) -> dict[str, Any]:
    use_pip = (not local) if pip is None else pip
    base: dict[str, Any] = {}
    source = runtime_env_file or (DEFAULT_RUNTIME_ENV if use_pip else None)
    if source is not None and Path(source).exists():
        base = load_runtime_env_file(Path(source))
    elif runtime_env_file is not None:
        raise FileNotFoundError(runtime_env_file)
    if not use_pip:
        base.pop("pip", None)
        base.pop("uv", None)
        base.pop("conda", None)
    excludes = list(dict.fromkeys(DEFAULT_EXCLUDES + list(base.get("excludes", []))
                                  + list(extra_excludes)))
    excludes += [p for p in large_files(working_dir, int(max_file_mb * 2**20), excludes)
                 if p not in excludes]
    runtime_env: dict[str, Any] = {**base, "working_dir": str(working_dir), "excludes": excludes}
    env_vars = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    store = os.environ.get("RETRIEVER_STORE")
    if local:
        from retriever.io.store import default_root

        env_vars.setdefault("RETRIEVER_STORE", default_root())
    elif store and "://" in store:
        env_vars.setdefault("RETRIEVER_STORE", store)
    env_vars.update(env)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if python:
        runtime_env["py_executable"] = python
    return runtime_env


# --------------------------------------------------------------------------- entrypoint


def job_module(job: str) -> str:
    if job.startswith("jobs."):
        return job
    if job in NOT_SUBMITTABLE:
        raise ValueError(f"`{job}` runs on this machine; it cannot be submitted")
    from jobs.cli import COMMANDS

    if job in COMMANDS:
        return COMMANDS[job][0]
    return f"jobs.{job}"


def build_entrypoint(module: str, args: list[str], python: str) -> str:
    return " ".join(shlex.quote(x) for x in [python, "-m", module, *args])


# --------------------------------------------------------------------------- run


async def _stream_logs(client: Any, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client: Any, job_id: str, timeout: float | None, follow: bool = True,
                 out=None) -> str:
    """Stream logs (if ``follow``) until the job ends; return its final status name."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retriever submit",
        description="Submit a job to a Ray cluster (Job Submission API), stream its logs and "
                    "exit with its status. Options go before JOB; everything after JOB is "
                    "passed to the job.",
    )
    p.add_argument("--address", default=None, help="Job API address, e.g. http://HEAD:8265")
    p.add_argument("--state", default=None, help="local cluster state file (see retriever cluster)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None,
                       help="treat the cluster as running on this machine (default: detected "
                            "from the address and the cluster's node IPs)")
    where.add_argument("--remote", dest="local", action="store_false",
                       help="treat the cluster as remote (e.g. a head forwarded to 127.0.0.1)")
    pip = p.add_mutually_exclusive_group()
    pip.add_argument("--pip", dest="pip", action="store_true", default=None,
                     help="install cluster/runtime_env.yaml's pip list (default for remote)")
    pip.add_argument("--no-pip", dest="pip", action="store_false",
                     help="reuse the cluster's Python env as is (default for local addresses)")
    p.add_argument("--runtime-env", type=Path, default=None,
                   help="runtime env YAML to start from (default cluster/runtime_env.yaml with --pip)")
    p.add_argument("--working-dir", type=Path, default=REPO_ROOT)
    p.add_argument("--exclude", action="append", default=[], help="extra upload exclude pattern")
    p.add_argument("--max-file-mb", type=float, default=20.0,
                   help="leave files larger than this out of the upload (default %(default)s)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="job env var")
    p.add_argument("--python", default=None,
                   help="interpreter for the entrypoint (and py_executable); default: this one "
                        "for local clusters without pip, else `python`")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--memory", type=int, default=None, help="bytes reserved for the driver")
    p.add_argument("--resources", default=None,
                   help='custom resources for the driver, JSON, e.g. {"worker_0": 0.01}')
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="seconds; stop the job after it")
    p.add_argument("--dry-run", action="store_true", help="print entrypoint + runtime env only")
    p.add_argument("job", help="a retriever command (eval, encode, plan...) or jobs.NAME")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    job_args = list(args.args)
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]
    try:
        module = job_module(args.job)
    except ValueError as exc:
        print(f"retriever submit: {exc}", file=sys.stderr)
        return 2
    working_dir = args.working_dir.resolve()
    module_file = working_dir / (module.replace(".", "/") + ".py")
    if not module_file.exists():
        print(f"retriever submit: {module} not found in {working_dir} ({module_file})",
              file=sys.stderr)
        return 2
    address = resolve_address(args.address, args.state)
    local = cluster_is_local(address) if args.local is None else args.local
    use_pip = (not local) if args.pip is None else args.pip
    python = args.python or (sys.executable if local and not use_pip else "python")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"retriever submit: --env takes K=V, got {item!r}", file=sys.stderr)
            return 2
        env[key] = value
    runtime_env = build_runtime_env(
        working_dir=working_dir, local=local, pip=args.pip, runtime_env_file=args.runtime_env,
        env=env, extra_excludes=args.exclude, max_file_mb=args.max_file_mb,
        python=args.python,
    )
    if not local and "://" not in runtime_env.get("env_vars", {}).get("RETRIEVER_STORE", ""):
        print("[retriever submit] warning: no RETRIEVER_STORE URL for a remote cluster; the job's "
              "default store would be a directory inside its temporary working dir. Pass "
              "--env RETRIEVER_STORE=s3://BUCKET/PREFIX (or the job's --out URL).", file=sys.stderr)
    entrypoint = build_entrypoint(module, job_args, python)
    submission_id = args.submission_id or (
        f"retriever-{module.split('.')[-1]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    if args.dry_run:
        print(json.dumps({"address": address, "local": local, "entrypoint": entrypoint,
                          "submission_id": submission_id, "runtime_env": runtime_env}, indent=2))
        return 0

    from ray.job_submission import JobSubmissionClient

    from retriever.ops.cluster import auth_headers

    # Our token only goes to a cluster on this machine; for a remote one Ray's own
    # RAY_AUTH_MODE / RAY_AUTH_TOKEN settings apply.
    client = JobSubmissionClient(address, headers=auth_headers() if local else None)
    submitted = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
        metadata={"retriever_job": module, "submitted_from": socket.gethostname()},
        entrypoint_num_cpus=args.num_cpus, entrypoint_num_gpus=args.num_gpus,
        entrypoint_memory=args.memory,
        entrypoint_resources=({k: float(v) for k, v in json.loads(args.resources).items()}
                              if args.resources else None),
    )
    print(f"[retriever submit] {submitted} submitted to {address}: {entrypoint}", file=sys.stderr,
          flush=True)
    if args.no_wait:
        print(submitted)
        return 0
    try:
        status = wait_for_job(client, submitted, args.timeout)
    except TimeoutError:
        print(f"[retriever submit] timed out after {args.timeout}s; stopping {submitted}",
              file=sys.stderr)
        client.stop_job(submitted)
        return 124
    except KeyboardInterrupt:
        print(f"\n[retriever submit] detached; {submitted} keeps running. Stop it with:\n"
              f"  ray job stop --address {address} {submitted}", file=sys.stderr)
        return 130
    info = client.get_job_info(submitted)
    message = f" ({info.message})" if getattr(info, "message", None) else ""
    print(f"[retriever submit] {submitted} {status}{message}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["submit", *sys.argv[1:]]))
