"""The Serve deployments: QueryEncoder (dynamic batching), ShardSearcher (one per shard), Router.

- ``QueryEncoder`` embeds query text with the encoder settings the index was built with;
  concurrent requests are batched by ``@serve.batch``.
- ``ShardSearcher`` loads its shards (FAISS file + id map each; one shard unless the app
  groups them) from the store (local path or any fsspec URL such as s3://) and answers their
  merged top-k in trec_eval order. The app binds it once per group under the names
  ``ShardSearcher-0 .. ShardSearcher-{G-1}``.
- ``Router`` is the FastAPI ingress (``serve/api.py``): it encodes the query (or takes the
  vector), fans out to every shard concurrently with a per-shard timeout, merges the top-k
  and, when a doc store is configured, adds title and text.

Replicas ask for fractions of a CPU by default; FAISS and torch use as many threads as the
replica was given whole CPUs (at least one), and a GPU only when Ray assigned one to the
replica (``ray_actor_options: {num_gpus: 1}``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Sequence

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from retriever.index.ranking import Hit
from serve.api import Coalescer

log = logging.getLogger("ray.serve")


def _assigned_gpus() -> int:
    """GPUs Ray assigned to this replica (a replica without any must not touch a GPU)."""
    try:
        import ray

        return len(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside Ray
        return 0


def _assigned_cpus() -> int:
    """Whole CPUs Ray assigned to this replica (at least 1)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside Ray
        cpus = 1.0
    return max(1, int(math.floor(cpus)))


def local_model(model: str) -> str:
    """A model named by a remote URL (s3://...) is copied to the local model cache first."""
    from retriever.io import store
    from retriever.modeling.registry import local_copy

    if not store.has_scheme(model) or store.is_local(model):
        return model[len("file://"):] if model.startswith("file://") else model
    return str(local_copy(model))


@serve.deployment(name="QueryEncoder", ray_actor_options={"num_cpus": 0.5},
                  max_ongoing_requests=128)
class QueryEncoder:
    """Query text -> vector, with concurrent requests batched into one forward pass."""

    def __init__(self, encoder_config: dict, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005):
        import torch

        from retriever.modeling.encoder import Encoder, EncoderConfig

        torch.set_num_threads(_assigned_cpus())
        config = dict(encoder_config)
        config["model"] = local_model(config["model"])
        if config.get("device", "auto") == "auto" and not _assigned_gpus():
            config["device"] = "cpu"
        self.encoder = Encoder(EncoderConfig(**config))
        self.encoder.encode_queries(["warm-up"])  # first-call setup before the first request
        self.encode.set_max_batch_size(max_batch_size)
        self.encode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        vectors = await asyncio.to_thread(self.encoder.encode_queries, list(texts))
        return list(vectors)

    def settings(self) -> dict:
        return self.encoder.settings()


@serve.deployment(name="ShardSearcher", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ShardSearcher:
    """One group of the index's shards (usually one shard), loaded from the store."""

    def __init__(self, index_url: str, numbers: Sequence[int], gpu: str = "auto"):
        import faiss

        from retriever.index.shards import IndexShard, read_manifest

        faiss.omp_set_num_threads(_assigned_cpus())
        if gpu == "auto":  # only a GPU Ray gave this replica
            gpu = "yes" if _assigned_gpus() else "no"
        manifest = read_manifest(index_url)
        self.shards = [IndexShard.load(index_url, n, manifest, gpu=gpu) for n in numbers]
        log.info("loaded %s of %s: %d rows", ", ".join(s.name for s in self.shards), index_url,
                 sum(len(s) for s in self.shards))

    async def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Merged top-k of this group's shards for each row of ``vectors`` [n, dim] (the
        Router batches queries)."""
        from retriever.index.shards import search_all

        # On the replica's event loop, not a thread pool: a few queries are a short FAISS
        # call (threads given to FAISS, not to Python); a thread hop costs more than it saves.
        return search_all(self.shards, vectors, k)

    def info(self) -> dict:
        return {"shards": [s.name for s in self.shards],
                "rows": sum(len(s) for s in self.shards), "dim": self.shards[0].dim}


def load_docs(url: str) -> dict[str, tuple[str, str]]:
    """doc id -> (title, text) from a BEIR folder / corpus.jsonl or an MS MARCO collection."""
    from retriever.io import store
    from retriever.io.formats import DataFormatError, load_collection_tsv, load_corpus

    target = url.rstrip("/")
    if not target.endswith((".jsonl", ".jsonl.gz", ".tsv", ".tsv.gz")):
        for name in ("corpus.jsonl", "corpus.jsonl.gz", "collection.tsv", "collection.tsv.gz"):
            if store.exists(store.join(target, name)):
                target = store.join(target, name)
                break
        else:
            raise DataFormatError(url, "no corpus.jsonl[.gz] or collection.tsv[.gz] here")
    corpus = (load_collection_tsv(target) if ".tsv" in target else load_corpus(target))
    return {doc_id: (title, text)
            for doc_id, title, text in zip(corpus.ids, corpus.titles, corpus.texts)}


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.2},
                  max_ongoing_requests=256)
@serve.ingress()
class Router:
    """The HTTP ingress: validation, auth, fan-out, merge (see ``serve/api.py``)."""

    def __init__(self, encoder: DeploymentHandle, searchers: Sequence[DeploymentHandle],
                 info: dict, api_settings: dict, docs: str | None = None):
        self.encoder = encoder
        self.shard_groups = info["searchers"]  # shard names held by each searcher, in order
        self.shard_names = [name for group in self.shard_groups for name in group]
        timeout = float(api_settings.get("timeout_s", 2.0))
        # method handles made once: `handle.search` builds a new handle on every access
        searches = [h.options(method_name="search") for h in searchers]
        self.coalescers = [Coalescer(lambda vectors, k, h=h: h.remote(vectors, k),
                                     timeout_s=timeout)
                           for h in searches]
        self.encode_handle = encoder.options(method_name="encode")
        self._info = dict(info, docs=bool(docs))
        self.dim = int(info["dims"])
        self.api_settings = api_settings
        self.docs = load_docs(docs) if docs else {}

    def __serve_build_asgi_app__(self):
        from serve.api import ApiSettings, make_api

        return make_api(self, ApiSettings(**self.api_settings))

    async def encode(self, text: str) -> np.ndarray:
        return await self.encode_handle.remote(text)

    def search_group(self, number: int, vector: np.ndarray, k: int):
        return self.coalescers[number].search(vector, k)

    def info(self) -> dict:
        return self._info

    def doc(self, doc_id: str) -> tuple[str, str] | None:
        return self.docs.get(doc_id)
