"""The Serve application builder: ``serve.app:build_app`` (``serve run`` / ``serve deploy`` /
RayService ``import_path``).

``build_app(args)`` reads the index manifest, takes the query encoder's settings from the
embeddings the index was built from (``source.encoder``; ``model`` overrides the model), checks
that this query encoder embeds like the index's (``retriever.modeling.parity``: weights
identity, pooling, normalisation, query prefix and length, dim; refused with both sides named
unless ``allow_asymmetric_encoder``), and binds QueryEncoder, one ShardSearcher per group of
``shards_per_searcher`` shards (``ShardSearcher-0`` ..; one shard each by default) and the
Router ingress. ``args`` (see :class:`AppArgs`): ``index`` (required), ``model``, ``docs``,
``timeout_s``, ``max_top_k``, ``max_query_chars``, ``max_batch`` (texts or vectors in one
request), ``encoder_batch_size``, ``encoder_batch_wait_s``, ``gpu``, ``mmap`` (memory-map the
FAISS files), ``shards_per_searcher``, ``shards_in_router``, ``access_log``, ``low_latency``,
``allow_asymmetric_encoder`` and ``deployments``: Serve-style per-deployment options (``name``,
``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``, ...)
applied in code; the name ``ShardSearcher`` applies to every searcher, ``ShardSearcher-<g>`` to
one. Options in a Serve config's own ``deployments:`` list override these in the usual Serve way
(there, searchers must be named one by one).

Grouping shards: a Router -> ShardSearcher call costs a Serve request (~4 ms of CPU on the
2-core development machine), so fanning out to more searchers than there are cores to run
them in parallel adds latency instead of removing it. One searcher per node (or per GPU),
holding that node's shards and searching them in one FAISS call per shard, is the usual
layout; ``shards_per_searcher: N`` on an N-shard index puts all shards in one searcher, the
fastest layout of searchers on a single machine (``benchmarks/search_latency.py`` measures
both). ``shards_in_router: true`` goes one step further on one node: the Router replica loads
every shard itself and searches them in a worker thread (concurrent queries coalesced into one
FAISS call), so a vector query costs no Serve call beyond the ingress; every Router replica
then holds a copy of the index (more memory), and there are no ShardSearcher deployments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from retriever.index import shards as sh
from retriever.errors import InputError

# Ray Serve's own latency switches (what RAY_SERVE_THROUGHPUT_OPTIMIZED turns on, minus gRPC
# and direct ingress, whose servers listen on every interface): user code and the handle
# router on the replica's main event loop instead of hops to other threads / loops, and no
# per-request log copies to stderr. Measured on the 2-core machine: ~30% less CPU per
# request in Router and ShardSearcher (benchmarks/search_latency.py). And the proxy's
# callback serve/proxy.py: a request's body goes with the request, so the Router does not
# call the proxy back for it (one actor round trip less per POST). The proxy reads them
# when it starts: set them before Ray starts (`retriever serve` does for a local cluster).
LOW_LATENCY_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                   "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
                   "RAY_SERVE_LOG_TO_STDERR": "0",
                   "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve.proxy:middlewares"}
DEPLOYMENT_OPTIONS = {"num_replicas", "autoscaling_config", "ray_actor_options",
                      "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
                      "health_check_timeout_s", "graceful_shutdown_timeout_s",
                      "graceful_shutdown_wait_loop_s", "user_config", "logging_config"}


@dataclass
class AppArgs:
    """Arguments of ``build_app``."""

    index: str
    model: str | None = None  # default: the model the index's embeddings were made with
    docs: str | None = None  # dataset folder / corpus file for title + text in hits
    timeout_s: float = 2.0  # per shard
    max_top_k: int = 1000
    max_query_chars: int = 2048
    max_batch: int = 128  # texts or vectors in one /search or /v1/embeddings request
    encoder_batch_size: int = 32
    encoder_batch_wait_s: float = 0.005
    gpu: str = "auto"  # FAISS on GPU for flat shards: auto | yes | no
    mmap: bool = False  # memory-map the FAISS files (read on demand; RAM shared via page cache)
    shards_per_searcher: int = 1  # shards held (and searched in one call) by one ShardSearcher
    shards_in_router: bool = False  # the Router holds every shard itself: no searcher hop
    access_log: bool = False  # a log line per request in every replica (costs latency)
    low_latency: bool = True  # LOW_LATENCY_ENV in every replica's runtime_env
    allow_asymmetric_encoder: bool = False  # serve a query encoder unlike the index's
    deployments: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "AppArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise InputError(f"serve app: unknown argument(s) {', '.join(unknown)}; expected "
                             f"{', '.join(sorted(names))}")
        if not args.get("index"):
            raise InputError("serve app: the 'index' argument (index folder URL) is required")
        values = dict(args)
        for name in ("access_log", "low_latency", "allow_asymmetric_encoder", "mmap",
                     "shards_in_router"):
            if isinstance(values.get(name), str):  # `serve run ... key=value` passes strings
                text = values[name].strip().lower()
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise InputError(f"serve app: {name}={values[name]!r} is not true/false")
                values[name] = text in ("true", "1", "yes")
        if "shards_per_searcher" in values:
            given = values["shards_per_searcher"]
            text = str(given).strip()
            if isinstance(given, (bool, float)) or not text.isdigit() or int(text) < 1:
                raise InputError(f"serve app: shards_per_searcher={given!r} must be an "
                                 "integer >= 1")
            values["shards_per_searcher"] = int(text)
        for name, kind in (("timeout_s", float), ("max_top_k", int), ("max_query_chars", int),
                           ("max_batch", int), ("encoder_batch_size", int),
                           ("encoder_batch_wait_s", float)):
            if name in values:  # `serve run ... key=value` passes strings
                try:
                    values[name] = kind(values[name])
                except (TypeError, ValueError):
                    raise InputError(f"serve app: {name}={values[name]!r} is not "
                                     f"{kind.__name__}") from None
        return cls(**values)


def encoder_config(manifest: dict, model: str | None = None) -> dict:
    """EncoderConfig fields for queries, from the embeddings' recorded encoder settings."""
    from retriever.modeling.encoder import EncoderConfig

    settings = (manifest.get("source") or {}).get("encoder") or {}
    if not (model or settings.get("model")):
        raise InputError("serve app: the index's embeddings name no encoder model; pass "
                         "model=NAME_OR_PATH")
    return dataclasses.asdict(EncoderConfig.replaying(settings, model))


def check_parity(manifest: dict, encoder: dict, app_args: AppArgs) -> None:
    """Refuse an index whose encoder differs from the query encoder ``encoder`` (EncoderConfig
    fields) unless ``allow_asymmetric_encoder`` (``retriever.modeling.parity``). The app's one
    QueryEncoder is fixed here, at build time, so this covers every ``/search`` with a query."""
    from retriever.modeling.encoder import EncoderConfig
    from retriever.modeling.parity import check_encoder_matches, index_settings, query_settings

    check_encoder_matches(index_settings(manifest), query_settings(EncoderConfig(**encoder)),
                          allow_asymmetric=app_args.allow_asymmetric_encoder,
                          index_name=f"index {app_args.index}")


def index_info(manifest: dict, model: str, groups: list[list[int]]) -> dict:
    """``/info``: the index, the model, the shards each searcher holds (``searchers``) and
    whether BM25 shards are there (``sparse``)."""
    from retriever.index.sparse import has_sparse

    recorded = (manifest.get("source") or {}).get("encoder") or {}
    return {"model": model, "model_hash": recorded.get("model_hash"),
            "shards": len(manifest["shards"]),
            "searchers": [[sh.shard_name(n) for n in group] for group in groups],
            "rows": manifest["rows"],
            "rows_per_shard": [s["rows"] for s in manifest["shards"]],
            "dims": manifest["dim"], "index_type": manifest["type"],
            "factory": manifest["factory"], "metric": manifest["metric"],
            "search_params": manifest.get("search_params", {}),
            "recall": manifest.get("recall"), "sparse": has_sparse(manifest)}


def _options(deployments: list[dict], searchers: int) -> dict[str, dict]:
    known = {"QueryEncoder", "Router", "ShardSearcher",
             *(f"ShardSearcher-{n}" for n in range(searchers))}
    by_name: dict[str, dict] = {}
    for entry in deployments:
        entry = dict(entry)
        name = entry.pop("name", None)
        if name not in known:
            raise InputError(f"serve app: deployment options for {name!r}: the app has "
                             f"QueryEncoder, Router and ShardSearcher-0..{searchers - 1} "
                             "('ShardSearcher' = every searcher)")
        bad = sorted(set(entry) - DEPLOYMENT_OPTIONS)
        if bad:
            raise InputError(f"serve app: deployment {name}: unknown option(s) "
                             f"{', '.join(bad)}")
        by_name.setdefault(name, {}).update(entry)
    return by_name


def _with_defaults(deployment, options: dict, env: dict) -> dict:
    """``options`` for ``deployment.options``: ``ray_actor_options`` merged over the
    decorator's (Serve would replace them whole) and ``env`` added to its runtime_env."""
    out = dict(options)
    actor = {**(deployment.ray_actor_options or {}), **options.get("ray_actor_options", {})}
    if env:
        runtime_env = dict(actor.get("runtime_env") or {})
        runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
        actor["runtime_env"] = runtime_env
    out["ray_actor_options"] = actor
    return out


def build_app(args: dict[str, Any]):
    from serve.deployments import QueryEncoder, Router, ShardSearcher

    app_args = AppArgs.from_dict(dict(args))
    manifest = sh.read_manifest(app_args.index)
    encoder = encoder_config(manifest, app_args.model)
    check_parity(manifest, encoder, app_args)
    shards = len(manifest["shards"])
    groups = ([list(range(shards))] if app_args.shards_in_router else
              sh.group_numbers(shards, app_args.shards_per_searcher))
    options = _options(app_args.deployments, 0 if app_args.shards_in_router else len(groups))
    logs = {"logging_config": {"enable_access_log": bool(app_args.access_log)}}
    env = LOW_LATENCY_ENV if app_args.low_latency else {}
    searcher_apps = []
    for number, group in enumerate([] if app_args.shards_in_router else groups):
        opts = {**logs, **options.get("ShardSearcher", {}),
                **options.get(f"ShardSearcher-{number}", {})}
        searcher_apps.append(ShardSearcher.options(name=f"ShardSearcher-{number}",
                                                   **_with_defaults(ShardSearcher, opts, env))
                             .bind(app_args.index, group, app_args.gpu, app_args.mmap))
    opts = {**logs, **options.get("QueryEncoder", {})}
    encoder_app = QueryEncoder.options(**_with_defaults(QueryEncoder, opts, env)).bind(
        encoder, app_args.encoder_batch_size, app_args.encoder_batch_wait_s)
    api_settings = {"timeout_s": app_args.timeout_s, "max_top_k": app_args.max_top_k,
                    "max_query_chars": app_args.max_query_chars,
                    "max_batch": app_args.max_batch}
    opts = {**logs, **options.get("Router", {})}
    own = ({"index": app_args.index, "gpu": app_args.gpu, "mmap": app_args.mmap}
           if app_args.shards_in_router else None)
    return Router.options(**_with_defaults(Router, opts, env)).bind(
        encoder_app, searcher_apps, index_info(manifest, encoder["model"], groups), api_settings,
        app_args.docs, own)
