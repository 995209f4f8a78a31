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

The work is done by :mod:`retriever.ops.submit` (Ray's ``JobSubmissionClient``); this module
parses the command line and maps JOB to its module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retriever.ops import submit as job_api

NOT_SUBMITTABLE = {"submit", "cluster"}


def job_module(job: str) -> str:
    """The module a JOB name runs: ``jobs.NAME`` as given, else the command's module."""
    if job.startswith("jobs."):
        return job
    if job in NOT_SUBMITTABLE:
        raise ValueError(f"`{job}` runs on this machine; it cannot be submitted")
    from jobs.cli import COMMANDS

    return COMMANDS[job][0] if job in COMMANDS else f"jobs.{job}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retriever submit",
        description="Submit a job to a Ray cluster (Job Submission API), stream its logs and "
                    "exit with its status. Options go before JOB; everything after JOB is "
                    "passed to the job.")
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
    p.add_argument("--working-dir", type=Path, default=job_api.REPO_ROOT)
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
    p.add_argument("--resources", type=json.loads, default=None,
                   help='custom resources for the driver, JSON, e.g. {"worker_0": 0.01}')
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--timeout", type=float, default=None, help="seconds; stop the job after it")
    p.add_argument("--dry-run", action="store_true", help="print entrypoint + runtime env only")
    p.add_argument("job", help="a retriever command (eval, encode, plan...) or jobs.NAME")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments")
    return p


def _plan(args: argparse.Namespace) -> job_api.Submission:
    """The submission the arguments describe; ValueError for a bad JOB or --env."""
    module = job_module(args.job)
    working_dir = args.working_dir.resolve()
    module_file = working_dir / (module.replace(".", "/") + ".py")
    if not module_file.exists():
        raise ValueError(f"{module} not found in {working_dir} ({module_file})")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env takes K=V, got {item!r}")
        env[key] = value
    job_args = args.args[1:] if args.args[:1] == ["--"] else list(args.args)
    return job_api.plan(
        module, job_args, address=job_api.resolve_address(args.address, args.state),
        local=args.local, pip=args.pip, python=args.python, working_dir=working_dir,
        runtime_env_file=args.runtime_env, env=env, extra_excludes=args.exclude,
        max_file_mb=args.max_file_mb, submission_id=args.submission_id)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        submission = _plan(args)
    except ValueError as exc:
        print(f"retriever submit: {exc}", file=sys.stderr)
        return 2
    if submission.remote_without_store_url:
        print("[retriever submit] warning: no RETRIEVER_STORE URL for a remote cluster; the job's "
              "default store would be a directory inside its temporary working dir. Pass "
              "--env RETRIEVER_STORE=s3://BUCKET/PREFIX (or the job's --out URL).", file=sys.stderr)
    if args.dry_run:
        print(json.dumps(submission.to_dict(), indent=2))
        return 0
    client = job_api.client_for(submission.address, submission.local)
    resources = {k: float(v) for k, v in args.resources.items()} if args.resources else None
    job_id = job_api.submit(client, submission, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                            memory=args.memory, resources=resources)
    print(f"[retriever submit] {job_id} submitted to {submission.address}: "
          f"{submission.entrypoint}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    return job_api.follow(client, job_id, submission.address, args.timeout)


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["submit", *sys.argv[1:]]))
