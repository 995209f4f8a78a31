"""Run the search application on a local (or joined) Ray: :class:`ServeConfig` in, its URL out.

:func:`start` starts (or joins) Ray, starts Serve's HTTP proxy on ``host:port`` and deploys
``serve.app:build_app`` under the name ``search`` at ``/``, non-blocking; :func:`serve_until_stopped`
waits for Ctrl-C / SIGTERM and shuts Serve and Ray down. The app's arguments come from a Serve
config file's first application (``serve_config``), overridden by the flags given; on a new
local Ray one ShardSearcher holds every shard unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from dataclasses import dataclass, field

from retriever.config import load_file
from retriever.errors import InputError
from retriever.ops import local_ray

APP_NAME = "search"


@dataclass
class ServeConfig:
    """Serve a sharded index over HTTP (Ray Serve)."""

    index: str | None = field(default=None, metadata={"help": "index folder URL (required "
                                                              "unless the --serve-config has it)"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host to bind"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    docs: str | None = field(default=None, metadata={
        "help": "dataset folder or corpus file: adds title and text to hits"})
    model: str | None = field(default=None, metadata={
        "help": "query encoder (default: the model the index's embeddings were made with)"})
    allow_asymmetric_encoder: bool | None = field(default=None, metadata={
        "help": "serve although the query encoder (--model) differs from the index's encoder "
                "(weights, pooling, prefixes, ...): an intended asymmetric query encoder; "
                "unset: the serve config's, else refused"})
    timeout_s: float | None = field(default=None, metadata={
        "help": "per-shard timeout in seconds; unset: the serve config's, else 2.0"})
    max_top_k: int | None = field(default=None, metadata={
        "help": "largest top_k accepted; unset: the serve config's, else 1000"})
    shards_per_searcher: int | None = field(default=None, metadata={
        "help": "shards one ShardSearcher deployment holds; unset: the serve config's, else "
                "all of them on a new local Ray (one machine: one searcher answers fastest), "
                "1 on a cluster"})
    shards_in_router: bool | None = field(default=None, metadata={
        "help": "the Router holds every shard and searches them itself: no ShardSearcher "
                "deployments, no searcher hop (one node; each Router replica holds the whole "
                "index); unset: the serve config's, else false"})
    mmap: bool | None = field(default=None, metadata={
        "help": "memory-map the FAISS shard files instead of reading them into memory (flat "
                "shards stay on CPU; remote shards are copied to a local cache first); unset: "
                "the serve config's, else false"})
    max_batch: int | None = field(default=None, metadata={
        "help": "most queries (or vectors, or /v1/embeddings inputs) in one request; unset: "
                "the serve config's, else 128"})
    serve_config: str | None = field(default=None, metadata={
        "help": "Serve config YAML: its first application's args and deployments"})
    ray_address: str | None = field(default=None, metadata={
        "help": "join this Ray cluster; unset: $RAY_ADDRESS (set under `ray job submit`), "
                "else a new local cluster"})
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs for a local Ray"})


def app_args(config: ServeConfig) -> dict:
    """build_app arguments: the Serve config file's, overridden by the flags given."""
    args: dict = {}
    if config.serve_config:
        data = load_file(config.serve_config)
        apps = data.get("applications") or []
        if not apps:
            raise InputError(f"{config.serve_config}: no applications")
        args.update(apps[0].get("args") or {})
        # Serve's own per-deployment list comes after (and so wins over) args.deployments.
        args["deployments"] = [*args.get("deployments", []), *apps[0].get("deployments", [])]
    from serve.app import AppArgs

    for f in dataclasses.fields(config):  # the flags that are app arguments, when given
        value = getattr(config, f.name)
        if f.name in AppArgs.__dataclass_fields__ and value is not None:
            args[f.name] = value
    if not args.get("index"):
        raise InputError("--index is required (or an 'index' arg in --serve-config)")
    return args


def single_machine_layout(args: dict) -> dict:
    """On one machine, unless told otherwise, one ShardSearcher holds every shard: a Serve
    call per searcher costs more than FAISS on one shard, and the cores are shared anyway
    (``benchmarks/search_latency.py``: 4 shards in 4 searchers vs 1 on 2 cores)."""
    from retriever.index import shards as sh

    if args.get("shards_per_searcher") is not None:
        return args
    return {**args, "shards_per_searcher": len(sh.read_manifest(args["index"])["shards"])}


def start(config: ServeConfig) -> str:
    """Deploy the app (non-blocking); returns its base URL."""
    import ray
    from ray import serve

    from serve.app import LOW_LATENCY_ENV, build_app

    args = app_args(config)
    address = None if ray.is_initialized() else (
        config.ray_address or os.environ.get("RAY_ADDRESS") or "local")
    if address == "local":
        args = single_machine_layout(args)
    app = build_app(args)  # reads the manifest: bad input fails before Ray starts
    if address is not None:
        if address == "local":  # a new local cluster: its proxy gets the latency switches too
            for name, value in LOW_LATENCY_ENV.items():
                os.environ.setdefault(name, value)
        local_ray.init(address, num_cpus=config.num_cpus if address == "local" else None,
                       log_to_driver=False)  # a new local Ray listens on loopback only
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def serve_until_stopped() -> None:
    """Block until SIGINT / SIGTERM, then shut Serve and Ray down."""
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()
