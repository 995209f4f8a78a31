"""Start (or join) Ray from this process, keeping a new local Ray on the loopback interface.

In: an address (``None``: ``$RAY_ADDRESS``, else a new local Ray) and ``ray.init`` keyword
arguments. Out: Ray initialised in this process. Every place in the project that starts Ray
goes through :func:`init`.

Why: a plain ``ray.init()`` on Linux gives the node the machine's routable address, and the
GCS, raylet, object manager, worker and agent gRPC ports then listen on it (or on ``*``), so
anyone on the same network can reach the cluster. Ray binds them to loopback when the node IP
is a loopback address, which it only allows while it believes multi-node clusters are off
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and Windows): that setting is
in force for this ``ray.init`` and inherited by the processes it starts. The dashboard (and
its Job API) listens on 127.0.0.1 too. Joining an existing cluster (an address other than
``local``) changes nothing. Not covered, because Ray hard-codes it: a Ray Serve replica's
inter-deployment gRPC server listens on ``[::]`` (Ray 2.60).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

LOOPBACK = "127.0.0.1"
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def single_node_mode() -> Iterator[None]:
    """Ray's single-node mode (node IP = loopback) for the processes started meanwhile."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"  # for Ray's child processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when this process resolves its node IP
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = saved_env


def init(address: str | None = None, **kwargs) -> None:
    """``ray.init`` unless Ray is already initialised; a new local Ray listens on loopback."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, **kwargs)
        return
    kwargs.setdefault("dashboard_host", LOOPBACK)
    with single_node_mode():
        ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)
