"""Exact inner-product search with FAISS (on all GPUs when present, else CPU), and the one
top-k search every FAISS index here answers through (:func:`search_index`).

With L2-normalised vectors inner product is cosine similarity. Results come back in
trec_eval order (see ``retriever.index.ranking``); ``TIE_MARGIN`` extra neighbours are fetched
so that a tie at the cut-off is still broken by doc id rather than by FAISS' internal order.
Row r's doc id comes from ``ids``: a plain sequence of str or a compact
:class:`retriever.index.idmap.IdMap` (a shard's), looked up for all hits of a batch at once.
"""

from __future__ import annotations

from typing import Sequence

import faiss
import numpy as np

from retriever.index.idmap import IdMap, lookup
from retriever.index.ranking import TIE_MARGIN, Hit, order


def faiss_gpu_count() -> int:
    """GPUs FAISS may use here: FAISS' own count (0 for a CPU build), and none unless the
    caller may use a GPU (inside a Ray task or actor: one Ray assigned to it)."""
    from retriever.modeling.device import usable_gpu_count

    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return min(faiss_gpus, usable_gpu_count()) if faiss_gpus else 0


def to_gpu_if_available(index: "faiss.Index") -> "faiss.Index":
    if faiss_gpu_count() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def as_float32(vectors: np.ndarray, name: str = "vectors") -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {vectors.shape}")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def search_index(index: "faiss.Index", ids: Sequence[str] | IdMap, queries: np.ndarray,
                 k: int) -> list[list[Hit]]:
    """Top-k of each query row in ``index`` (whose label r is ``ids[r]``), in trec_eval order."""
    queries = as_float32(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"query dimension {queries.shape[1]} != index dimension {index.d}")
    fetch = min(len(ids), k + TIE_MARGIN)
    if fetch == 0 or k < 1:
        return [[] for _ in range(queries.shape[0])]
    scores, rows = index.search(queries, fetch)
    found = rows >= 0  # FAISS pads a short answer with label -1
    names, values = lookup(ids, rows[found]), scores[found].tolist()
    ends = np.cumsum(found.sum(axis=1)).tolist()
    return [order(zip(names[start:end], values[start:end]), k)
            for start, end in zip([0] + ends[:-1], ends)]


class ExactSearcher:
    """A flat inner-product index over ``vectors`` whose rows are named by ``ids``."""

    def __init__(self, vectors: np.ndarray, ids: Sequence[str], use_gpu: bool = True):
        vectors = as_float32(vectors)
        if len(ids) != vectors.shape[0]:
            raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
        self.ids = list(ids)
        self.dim = vectors.shape[1]
        index = faiss.IndexFlatIP(self.dim)
        index.add(vectors)
        self.index = to_gpu_if_available(index) if use_gpu else index

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        return search_index(self.index, self.ids, queries, k)
