"""The search API without Ray: the same FastAPI app over shards and an encoder in this process.

``LocalBackend`` implements ``serve.api.Backend`` with loaded
``retriever.index.shards.IndexShard`` objects (and the index's BM25 shards, when it has them)
and an ``Encoder``; ``make_api(LocalBackend(...))``
is the app. Used for development (``uvicorn``), the browser test and as the in-process peer in
``benchmarks/search_latency.py``. Like the Serve app, it refuses an index whose recorded encoder
differs from its query encoder unless ``allow_asymmetric_encoder``
(``retriever.modeling.parity``).
"""

from __future__ import annotations

import asyncio

import numpy as np

from retriever.index import shards as sh
from serve.fanout import ShardAnswer, ShardQuery, answer, encode_requests


class LocalBackend:
    def __init__(self, index: str, model: str | None = None, docs: str | None = None,
                 gpu: str = "auto", encoder=None, shards_per_searcher: int = 1,
                 allow_asymmetric_encoder: bool = False, mmap: bool = False):
        from retriever.modeling.parity import check_encoder_matches, index_settings
        from serve.app import encoder_config, index_info
        from retriever.index import sparse
        from serve.deployments import load_docs

        self.manifest = sh.read_manifest(index)
        numbers = range(len(self.manifest["shards"]))
        self.shards = [sh.IndexShard.load(index, n, self.manifest, gpu, mmap=mmap)
                       for n in numbers]
        self.sparse_shards = ([sparse.SparseShard.load(index, n, self.manifest) for n in numbers]
                              if sparse.has_sparse(self.manifest) else [])
        self.sparse = bool(self.sparse_shards)
        self.shard_names = [s.name for s in self.shards]
        self.groups = sh.group_numbers(len(self.shards), shards_per_searcher)
        self.dim = int(self.manifest["dim"])
        self.encoder_config = encoder_config(self.manifest, model)
        self._encoder = encoder
        if not allow_asymmetric_encoder:  # allowed: nothing to refuse, no weights to read
            check_encoder_matches(index_settings(self.manifest), self._query_settings(),
                                  index_name=f"index {index}")
        self.docs = load_docs(docs) if docs else {}
        self._info = dict(index_info(self.manifest, self.encoder_config["model"],
                                     self.groups), docs=bool(docs))
        self.shard_groups = self._info["searchers"]

    def _query_settings(self) -> dict:
        """The query encoder's recorded settings, without loading weights when none is given."""
        if self._encoder is not None:
            return self._encoder.settings()
        from retriever.modeling.encoder import EncoderConfig
        from retriever.modeling.parity import query_settings

        return query_settings(EncoderConfig(**self.encoder_config))

    @property
    def encoder(self):
        if self._encoder is None:
            from retriever.modeling.encoder import Encoder, EncoderConfig

            self._encoder = Encoder(EncoderConfig(**self.encoder_config))
        return self._encoder

    async def encode(self, texts: list[str], kind: str = "query"
                     ) -> tuple[np.ndarray, list[int]]:
        return (await asyncio.to_thread(encode_requests, self.encoder, [(kind, texts)]))[0]

    async def search_group(self, number: int, query: ShardQuery) -> ShardAnswer:
        numbers = self.groups[number]
        return answer([self.shards[n] for n in numbers],
                      [self.sparse_shards[n] for n in numbers] if self.sparse else [], query)

    def info(self) -> dict:
        return self._info

    def doc(self, doc_id: str) -> tuple[str, str] | None:
        return self.docs.get(doc_id)
