"""The Serve deployments: QueryEncoder (dynamic batching), ShardSearcher (one per shard), Router.

- ``QueryEncoder`` embeds texts (queries, or passages for ``/v1/embeddings``) with the encoder
  settings the index was built with; concurrent requests are batched by ``@serve.batch``.
- ``ShardSearcher`` loads its shards (FAISS file + id map each, and the BM25 shard of the same
  documents when the index has them; one shard unless the app groups them) from the store
  (local path or any fsspec URL such as s3://; FAISS files memory-mapped with ``mmap``) and
  answers their merged dense and/or BM25 top-k in trec_eval order, in one call. The app binds it once per group under the names
  ``ShardSearcher-0 .. ShardSearcher-{G-1}``.
- ``Router`` is the FastAPI ingress (``serve/api.py``): it encodes the queries (or takes the
  vectors), fans out to every searcher concurrently with a per-searcher timeout (concurrent
  requests coalesced, ``serve/fanout.py``), merges each ranking, fuses them for hybrid and,
  when a doc store is configured, adds title and text.

Replicas ask for fractions of a CPU by default; FAISS and torch use as many threads as the
replica was given whole CPUs (at least one), and a GPU only when Ray assigned one to the
replica (``ray_actor_options: {num_gpus: 1}``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from typing import Sequence

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.fanout import (Coalescer, ShardAnswer, ShardQuery, answer, combine_encodes,
                          split_encodes)

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
    """Texts -> vectors with the index's encoder settings; concurrent requests (each a
    ``(kind, texts)`` pair, kind "query" or "passage") are batched by ``@serve.batch`` into one
    forward pass per kind. Answers ``(vectors [n, dim] float32, tokens per text)``."""

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
    async def encode(self, calls: list[list[tuple[str, list[str]]]]
                     ) -> list[list[tuple[np.ndarray, list[int]]]]:
        """Each call: the ``(kind, texts)`` requests a Router coalesced; one answer each."""
        from serve.fanout import encode_requests

        flat = [request for call in calls for request in call]
        answers = await asyncio.to_thread(encode_requests, self.encoder, flat)
        out, at = [], 0
        for call in calls:
            out.append(answers[at:at + len(call)])
            at += len(call)
        return out

    def settings(self) -> dict:
        return self.encoder.settings()


def load_group(index_url: str, numbers: Sequence[int], gpu: str = "auto",
               mmap: bool = False) -> tuple[list, list]:
    """The dense shards ``numbers`` of an index and their BM25 shards (none when the index
    has no sparse shards), with FAISS given this replica's CPUs (and GPU, if Ray gave one)."""
    import faiss

    from retriever.index import sparse
    from retriever.index.shards import IndexShard, read_manifest

    faiss.omp_set_num_threads(_assigned_cpus())
    if gpu == "auto":  # only a GPU Ray gave this replica
        gpu = "yes" if _assigned_gpus() else "no"
    manifest = read_manifest(index_url)
    dense = [IndexShard.load(index_url, n, manifest, gpu=gpu, mmap=mmap) for n in numbers]
    bm25 = ([sparse.SparseShard.load(index_url, n, manifest) for n in numbers]
            if sparse.has_sparse(manifest) else [])
    log.info("loaded %s of %s: %d rows%s", ", ".join(s.name for s in dense), index_url,
             sum(len(s) for s in dense), " (dense + BM25)" if bm25 else "")
    return dense, bm25


@serve.deployment(name="ShardSearcher", ray_actor_options={"num_cpus": 0.1},
                  max_ongoing_requests=64)
class ShardSearcher:
    """One group of the index's shards (usually one shard), loaded from the store."""

    def __init__(self, index_url: str, numbers: Sequence[int], gpu: str = "auto",
                 mmap: bool = False):
        self.shards, self.sparse = load_group(index_url, numbers, gpu, mmap)

    async def search(self, query: ShardQuery) -> ShardAnswer:
        """This group's merged rankings (dense for ``query.vectors``, BM25 for
        ``query.texts``) in one call; the Router coalesces queries into it."""
        # On the replica's event loop, not a thread pool: a few queries are a short FAISS
        # call (threads given to FAISS, not to Python); a thread hop costs more than it saves.
        return answer(self.shards, self.sparse, query)

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
                 info: dict, api_settings: dict, docs: str | None = None,
                 own_shards: dict | None = None):
        from serve.api import InFlight

        self.shard_groups = info["searchers"]  # shard names held by each searcher, in order
        self.shard_names = [name for group in self.shard_groups for name in group]
        timeout = float(api_settings.get("timeout_s", 2.0))
        self.in_flight = InFlight()  # counted by the API's middleware
        # method handles made once: `handle.search` builds a new handle on every access
        searches = [h.options(method_name="search") for h in searchers]
        self.coalescers = [Coalescer(h.remote, timeout_s=timeout) for h in searches]
        if own_shards:  # shards_in_router: no searcher hop. Concurrent queries: FAISS in a
            # thread, so that those arriving meanwhile leave together in the next call; a lone
            # query (concurrency 1): FAISS at once on the event loop, no thread hop
            dense, bm25 = load_group(own_shards["index"], range(len(self.shard_names)),
                                     own_shards.get("gpu", "auto"), own_shards.get("mmap"))
            self.coalescers = [Coalescer(lambda q: asyncio.to_thread(answer, dense, bm25, q),
                                         timeout_s=timeout,
                                         inline=functools.partial(answer, dense, bm25),
                                         alone=lambda: self.in_flight.requests <= 1)]
        encode = encoder.options(method_name="encode").remote
        self.encoder_calls = Coalescer(encode, timeout_s=max(timeout, 30.0),
                                       combine=combine_encodes, split=split_encodes)
        self._info = dict(info, docs=bool(docs))
        self.dim = int(info["dims"])
        self.sparse = bool(info.get("sparse"))
        self.api_settings = api_settings
        self.docs = load_docs(docs) if docs else {}

    def __serve_build_asgi_app__(self):
        from serve.api import ApiSettings, make_api

        return make_api(self, ApiSettings(**self.api_settings), self.in_flight)

    async def encode(self, texts: list[str], kind: str = "query"
                     ) -> tuple[np.ndarray, list[int]]:
        return await self.encoder_calls.search((kind, list(texts)))

    def search_group(self, number: int, query: ShardQuery):
        return self.coalescers[number].search(query)

    def info(self) -> dict:
        return self._info

    def doc(self, doc_id: str) -> tuple[str, str] | None:
        return self.docs.get(doc_id)
