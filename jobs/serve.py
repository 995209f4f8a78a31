"""Serve an index locally: ``retriever serve --index URL [--host 127.0.0.1 --port N --docs URL]``.

Starts (or joins) Ray, starts Serve's HTTP proxy on ``--host:--port`` (loopback unless told
otherwise) and deploys the search application (``serve/app.py``: QueryEncoder -> Router ->
ShardSearcher x N) under the name ``search`` at ``/``; then waits until interrupted.
``--serve-config FILE`` takes the application's ``args`` and ``deployments`` (replicas,
autoscaling, actor options) from a Serve config file such as ``serve/config.yaml``; flags win
over its args. The query encoder must embed like the index's encoder (weights, pooling, prefixes,
dim: ``retriever.modeling.parity``); ``--allow-asymmetric-encoder`` serves a different one on
purpose. ``--mmap true`` memory-maps the FAISS shard files. The same app deploys on a cluster with ``serve deploy serve/config.yaml`` or a
KubeRay RayService. Set ``RETRIEVER_API_TOKEN`` to require a bearer token. The work is
``serve/launch.py``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from serve.launch import (APP_NAME, ServeConfig, app_args, serve_until_stopped,
                          single_machine_layout, start)

__all__ = ["APP_NAME", "ServeConfig", "app_args", "main", "single_machine_layout", "start"]


def main(argv: list[str] | None = None) -> int:
    url = start(cfg.parse(ServeConfig, argv, prog="retriever serve"))
    print(f"serving {APP_NAME} at {url}/ (POST /search, POST /v1/embeddings, GET /info, "
          f"GET /healthz, API docs at /docs); Ctrl-C stops", flush=True)
    serve_until_stopped()
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["serve", *sys.argv[1:]]))
