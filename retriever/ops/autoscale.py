"""Autoscaling node groups: the local fake-multi-node config, the fit check, the node census.

In: a Ray cluster launcher YAML (``cluster/aws.yaml``: ``available_node_types`` with
``min_workers`` / ``max_workers`` / ``resources``, ``idle_timeout_minutes``, ``max_workers``).
Out:

* :func:`local_config` -- the autoscaling config for ``ray start --head
  --autoscaling-config`` over Ray's fake multi-node provider (``fake_multinode``, Ray's own
  laptop-mode provider: each launched "node" is a raylet on this machine, started and
  terminated by Ray's real autoscaler, so scheduling demand, launching and idle termination
  are Ray's own). The worker groups keep the launcher's names, ``min_workers``,
  ``max_workers`` and custom resources; the head takes no work (``CPU: 0``). Differences,
  and the only ones that change what a job sees: a group's ``GPU`` count becomes the custom
  resource :data:`FAKE_GPU` (code that calls CUDA cannot run on a faked GPU, so jobs ask for
  the group's own custom resource, e.g. ``{"gpu_a10g": 1}``, which both clusters have), and
  the node sizes are shrunk to fit one machine (``CPU`` capped, a small object store). The
  head's type is the fake provider's fixed ``ray.head.default``.
* :func:`check_fits` -- a request of N bundles (workers / actors) checked against the groups
  before it is submitted: a request no group can hold, or one needing more nodes of a group
  than its ``max_workers``, raises :class:`Unschedulable` naming the group and the limit
  (Ray would otherwise leave it pending forever).
* :func:`group_of` / :func:`census` -- which group an ALIVE node belongs to, told by its
  resources (the group's custom resources; Ray 2.60's state API shows no node-type label for
  these nodes), and the worker nodes counted by group.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.errors import InputError

FAKE_GPU = "fake_gpu"  # stands in for "GPU" on the local cluster's accelerator groups
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's type
CONFIG_ENV = "RETRIEVER_AUTOSCALING_CONFIG"  # where a job driver finds the groups
# What the cloud launcher leaves on the head (the prepared launcher config): drivers there
# read their groups from it.
LAUNCHER_BOOTSTRAP = "~/ray_bootstrap_config.yaml"
# Fields `ray start --autoscaling-config` reads as they are (the monitor does not fill in
# defaults: Ray's own example YAML for this provider is not in the wheel).
_EMPTY_FIELDS = {
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
}


class Unschedulable(InputError):
    """A request the cluster's node groups can never hold."""


@dataclass
class FakeNodeSizes:
    """How launched nodes are shrunk to fit one machine."""

    node_cpus: float = 2.0  # cap on a group's CPU count
    object_store_mb: int = 100  # per launched node
    idle_timeout_minutes: float | None = None  # None: the launcher's


def load_launcher(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the cluster config ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("available_node_types"), dict):
        raise InputError(f"{path}: no available_node_types (not a Ray cluster launcher config)")
    return data


def fake_resources(resources: dict[str, float], sizes: FakeNodeSizes) -> dict[str, float]:
    """A launcher group's resources as a fake node's: GPU -> FAKE_GPU, CPU capped."""
    out = {k: float(v) for k, v in resources.items() if k not in ("GPU", "CPU")}
    if resources.get("GPU"):
        out[FAKE_GPU] = float(resources["GPU"])
    out["CPU"] = float(min(float(resources.get("CPU", sizes.node_cpus)), sizes.node_cpus))
    out["object_store_memory"] = sizes.object_store_mb * 2**20
    return out


def local_config(launcher: dict[str, Any], gcs_address: str, head_resources: dict[str, float],
                 sizes: FakeNodeSizes | None = None) -> dict[str, Any]:
    """The fake-multi-node autoscaling config mirroring ``launcher``'s worker groups."""
    sizes = sizes or FakeNodeSizes()
    head_type = launcher.get("head_node_type")
    groups = {name: {"resources": fake_resources(group.get("resources", {}), sizes),
                     "node_config": {}, "min_workers": int(group.get("min_workers", 0)),
                     "max_workers": int(group.get("max_workers", 0))}
              for name, group in launcher["available_node_types"].items() if name != head_type}
    groups[FAKE_HEAD_TYPE] = {"resources": {"CPU": 0, **head_resources}, "node_config": {},
                              "max_workers": 0}
    idle = sizes.idle_timeout_minutes
    return {
        "cluster_name": f"{launcher.get('cluster_name', 'cluster')}-local",
        "max_workers": int(launcher.get("max_workers", sum(g["max_workers"]
                                                           for g in groups.values()))),
        "upscaling_speed": float(launcher.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(idle if idle is not None
                                      else launcher.get("idle_timeout_minutes", 5)),
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True,
                     "launch_multiple": True},
        "available_node_types": groups, "head_node_type": FAKE_HEAD_TYPE, **_EMPTY_FIELDS,
    }


# --------------------------------------------------------------------------- fit check


def per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many ``bundle``s one node with ``node``'s resources holds (0: none)."""
    wanted = {k: v for k, v in bundle.items() if v > 0}
    if not wanted:
        return 10**9
    return min(int(node.get(k, 0) // v) for k, v in wanted.items())


def check_fits(config: dict[str, Any], bundle: dict[str, float], count: int,
               what: str = "the job", spread: bool = False) -> str:
    """The group that can hold ``count`` x ``bundle`` (one per node if ``spread``), else
    :class:`Unschedulable` naming the groups and their limits. ``config``: a launcher or a
    local autoscaling config (both have ``available_node_types``)."""
    head = config.get("head_node_type")
    limits = []
    for name, group in config["available_node_types"].items():
        if name == head:
            continue
        fits = min(per_node(bundle, group.get("resources", {})), 1 if spread else 10**9)
        if fits < 1:
            continue
        needed, limit = math.ceil(count / fits), int(group.get("max_workers", 0))
        if needed <= limit:
            return name
        limits.append(f"{name} would need {needed} nodes ({fits} per node) but its "
                      f"max_workers is {limit}")
    request = f"{count} x {json.dumps(bundle, sort_keys=True)}"
    if not limits:
        raise Unschedulable(f"{what} asks for {request}: no node group has those resources "
                            "(groups: " + ", ".join(n for n in config["available_node_types"]
                                                    if n != head) + ")")
    raise Unschedulable(f"{what} asks for {request}: " + "; ".join(limits))


def cluster_groups() -> dict[str, Any] | None:
    """The autoscaling config a driver runs under: ``$RETRIEVER_AUTOSCALING_CONFIG``, else
    the launcher's bootstrap config on a cloud head, else ``None`` (a fixed cluster)."""
    path = os.environ.get(CONFIG_ENV) or os.path.expanduser(LAUNCHER_BOOTSTRAP)
    if not os.path.exists(path):
        return None
    if path.endswith(".json"):
        return json.loads(Path(path).read_text())
    return load_launcher(path)


def check_request(bundle: dict[str, float], count: int, what: str, spread: bool = False) -> None:
    """:func:`check_fits` against the driver's cluster groups when it has any; only a
    request naming a custom resource of some group is checked (plain CPU work runs wherever)."""
    bundle = {k: float(v) for k, v in bundle.items() if v}
    config = cluster_groups()
    if config is None or not set(bundle) - {"CPU", "memory"}:
        return
    check_fits(config, bundle, count, what, spread)


# --------------------------------------------------------------------------- census


def group_of(resources: dict[str, float], config: dict[str, Any]) -> str | None:
    """The worker group whose custom resources (all but CPU and the object store) the node's
    ``resources`` match, or ``None`` (the head, a node of no group)."""
    for name, group in config["available_node_types"].items():
        if name == config.get("head_node_type"):
            continue
        own = {k: float(v) for k, v in group.get("resources", {}).items()
               if k not in ("CPU", "object_store_memory", "memory")}
        if own and all(float(resources.get(k, -1)) == v for k, v in own.items()):
            return name
    return None


def census(nodes: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, int]:
    """ALIVE worker nodes (``retriever.ops.cluster.alive_nodes`` rows) counted by group."""
    counts: dict[str, int] = {}
    for node in nodes:
        if node.get("is_head"):
            continue
        name = group_of(node.get("resources", {}), config) or "?"
        counts[name] = counts.get(name, 0) + 1
    return counts
