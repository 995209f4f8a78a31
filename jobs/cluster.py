"""``retriever cluster``: bring a Ray cluster up or down.

    retriever cluster up --local [--workers 2]     # head + N workers on 127.0.0.1
    retriever cluster up --local --autoscale       # head alone; autoscaled aws.yaml groups
    retriever cluster status --local
    retriever cluster down --local

    retriever cluster up --config cluster/aws.yaml      # = ray up -y cluster/aws.yaml
    retriever cluster down --config cluster/aws.yaml    # = ray down -y cluster/aws.yaml

The local cluster's state (pids, ports, temp dir) is kept in a JSON file
(``--state``, default ``$RETRIEVER_CLUSTER_STATE`` or ``~/.local/state/retriever/local-cluster.json``);
``retriever submit`` finds the cluster's Job API address there when no ``--address`` is given.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from retriever.ops import autoscale
from retriever.ops import cluster as lc


def _resources(text: str | None) -> dict[str, float]:
    data = json.loads(text or "{}")
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError("--*-resources takes a JSON object")
    return {str(k): float(v) for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retriever cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="a head and N workers on this machine (127.0.0.1)")
    where.add_argument("--config", help="a Ray cluster launcher YAML (e.g. cluster/aws.yaml)")
    p.add_argument("--state", default=None, help="local cluster state file")
    p.add_argument("--workers", type=int, default=None, help="worker nodes (default 1; 0 "
                   "with --autoscale)")
    p.add_argument("--autoscale", nargs="?", const="cluster/aws.yaml", metavar="LAUNCHER_YAML",
                   help="the head alone; Ray's autoscaler launches fake nodes of the launcher "
                        "YAML's groups on demand (default: cluster/aws.yaml)")
    p.add_argument("--idle-timeout-minutes", type=float, default=None,
                   help="--autoscale: idle nodes leave after this (default: the launcher's)")
    p.add_argument("--node-cpus", type=float, default=2.0, help="--autoscale: CPUs per node")
    for name, default in (("--head-cpus", 1), ("--worker-cpus", 1), ("--worker-gpus", 0)):
        p.add_argument(name, type=int, default=default)
    p.add_argument("--head-resources", default=None, help='extra head resources, JSON ({"x": 1})')
    p.add_argument("--worker-resources", default=None, help="extra resources on every worker, JSON")
    p.add_argument("--object-store-mb", type=int, default=256, help="per node (default %(default)s)")
    p.add_argument("--temp-dir", default=None, help="Ray temp dir (default a fresh /tmp/rtc-*)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the nodes")
    p.add_argument("--keep-logs", action="store_true", help="down: keep the temp dir (logs)")
    p.add_argument("--dry-run", action="store_true", help="--config: print the ray command only")
    p.add_argument("--json", action="store_true", help="print state/status as JSON")
    return p


def _launcher(args: argparse.Namespace) -> int:
    if args.action == "status":
        cmd = ["ray", "status"]
        print("for a launched cluster run: ray attach " + shlex.quote(args.config)
              + " then " + " ".join(cmd))
        return 0
    cmd = ["ray", args.action, "-y", args.config]
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    if not Path(args.config).exists():
        print(f"retriever cluster: no such config {args.config}", file=sys.stderr)
        return 2
    ray = Path(sys.executable).parent / "ray"
    return subprocess.call([str(ray) if ray.exists() else "ray", *cmd[1:]])


def _up(args: argparse.Namespace) -> int:
    sizes = autoscale.FakeNodeSizes(args.node_cpus, args.object_store_mb // 2,
                                    args.idle_timeout_minutes)
    cfg = lc.LocalClusterConfig(
        workers=0 if args.autoscale and args.workers is None else (args.workers or 1),
        autoscale_from=args.autoscale, fake_nodes=sizes, head_cpus=args.head_cpus,
        worker_cpus=args.worker_cpus, worker_gpus=args.worker_gpus,
        head_resources=_resources(args.head_resources),
        worker_resources=_resources(args.worker_resources),
        object_store_memory=args.object_store_mb * 2**20, temp_dir=args.temp_dir,
        state_path=args.state, timeout_s=args.timeout)
    try:
        cluster = lc.up(cfg)
    except (lc.ClusterError, autoscale.InputError) as exc:
        print(f"retriever cluster: {exc}", file=sys.stderr)
        return 1
    if args.json:
        return print(cluster.to_json()) or 0
    auth = "RAY_AUTH_MODE=token " if cluster.auth == "token" else ""
    print(f"local Ray cluster up: head + {cfg.workers} worker(s)" + (
        f"; autoscaling {args.autoscale}'s groups ({cluster.autoscaling_config})"
        if args.autoscale else "") +
        f"\n  Job API / dashboard  {cluster.dashboard_url}\n  GCS address          "
        f"{cluster.gcs_address}\n  temp dir (logs)      {cluster.temp_dir}\n  state        "
        f"        {cluster.state_path}\nsubmit with:  retriever submit plan --docs 1e6   "
        f"(finds this cluster by its state)\nor:           {auth}RAY_API_SERVER_ADDRESS="
        f"{cluster.dashboard_url} ray job submit ...\ndrivers:      {auth}RAY_ADDRESS="
        f"{cluster.gcs_address} retriever train ..." + (
            "\n  (token auth is on: Ray's token in ~/.ray/auth_token; RAY_AUTH_MODE=disabled "
            "before `up` turns it off)" if cluster.auth == "token" else "") +
        "\nstop with:    retriever cluster down --local" +
        (f" --state {shlex.quote(args.state)}" if args.state else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        return _launcher(args)
    if args.action == "up":
        return _up(args)
    if args.action == "down":
        if (existing := lc.load_state(args.state)) is None:
            return print("retriever cluster: no local cluster recorded", file=sys.stderr) or 0
        groups = lc.down(args.state, keep_temp=args.keep_logs)
        print(f"local Ray cluster down ({len(groups)} node(s) stopped"
              + (f"; logs kept in {existing.temp_dir}" if args.keep_logs else "") + ")")
        return 0
    info = lc.status(args.state)
    if args.json:
        print(json.dumps(info, indent=2))
    elif not info["running"]:
        print("no local cluster running")
    else:
        print(f"local Ray cluster at {info['dashboard_url']} "
              f"({info.get('alive_nodes', '?')} nodes alive)")
        for n in info["nodes"]:
            print(f"  {n['role']:<10} pid {n['pid']:<8} {'alive' if n['alive'] else 'DEAD'}  "
                  f"{json.dumps(n['resources'])}")
        if "groups" in info:
            print(f"  autoscaled worker nodes by group: {json.dumps(info['groups'])}")
    return 0 if info["running"] else 1

if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["cluster", *sys.argv[1:]]))
