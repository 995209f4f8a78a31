"""Evaluate a retriever on a test collection: retrieve for every judged query, then score.

The pieces a job composes: :func:`dense_run` (Encoder + exact FAISS search),
:func:`bm25_run`, :func:`hybrid_run` (both, fused by ``retriever.index.fusion``), and
:func:`score_run` (metrics with trec_eval semantics + counts).
"""

from __future__ import annotations

import time

from retriever.evaluation import metrics
from retriever.index.bm25 import BM25Config, BM25Index
from retriever.index.fusion import FusionConfig, depth, fuse_all
from retriever.io.formats import Dataset
from retriever.modeling.encoder import Encoder
from retriever.index.ranking import Run, drop_identical_ids
from retriever.index.exact import ExactSearcher


def dense_run(encoder: Encoder, dataset: Dataset, k: int = 1000) -> tuple[Run, dict]:
    queries = dataset.judged_queries()
    started = time.perf_counter()
    doc_vectors = encoder.encode_passages(dataset.corpus.passages())
    encoded = time.perf_counter()
    query_vectors = encoder.encode_queries(list(queries.values()))
    searcher = ExactSearcher(doc_vectors, dataset.corpus.ids)
    hits = searcher.search(query_vectors, k)
    timing = {"encode_docs_s": encoded - started,
              "docs_per_s": len(dataset.corpus) / max(encoded - started, 1e-9),
              "queries_and_search_s": time.perf_counter() - encoded}
    return dict(zip(queries, hits)), timing


def bm25_run(dataset: Dataset, k: int = 1000,
             config: BM25Config | None = None) -> tuple[Run, dict]:
    queries = dataset.judged_queries()
    started = time.perf_counter()
    index = BM25Index(dataset.corpus.passages(), dataset.corpus.ids, config)
    indexed = time.perf_counter()
    hits = index.search(list(queries.values()), k)
    timing = {"index_s": indexed - started, "search_s": time.perf_counter() - indexed}
    return dict(zip(queries, hits)), timing


def hybrid_run(encoder: Encoder, dataset: Dataset, k: int = 1000,
               fusion: FusionConfig | None = None,
               config: BM25Config | None = None) -> tuple[Run, dict]:
    """BM25 and the dense run, each to ``fusion.depth(k)``, fused into the top ``k`` (what a
    hybrid search over sharded indexes answers: fusion after each ranking's global merge)."""
    fusion = fusion or FusionConfig()
    fetch = depth(k)
    dense, dense_timing = dense_run(encoder, dataset, fetch)
    sparse, sparse_timing = bm25_run(dataset, fetch, config)
    started = time.perf_counter()
    fused = fuse_all([dense[q] for q in dense], [sparse[q] for q in dense], k, fusion)
    timing = {**dense_timing, **{f"bm25_{name}": value for name, value in sparse_timing.items()},
              "fusion_s": time.perf_counter() - started}
    return dict(zip(dense, fused)), timing


def score_run(dataset: Dataset, run: Run, ignore_identical_ids: bool = False) -> dict:
    """Metrics (keys as in ``retriever.evaluation.metrics.METRICS``) plus the counts behind them."""
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    scores = metrics.evaluate(dataset.qrels, run)
    judged = {q for q, j in dataset.qrels.items() if any(g > 0 for g in j.values())}
    counts = {"docs": len(dataset.corpus), "queries": len(dataset.judged_queries()),
              "scored_queries": len(judged),
              "judged_pairs": sum(len(j) for j in dataset.qrels.values()),
              "relevant_pairs": sum(g > 0 for j in dataset.qrels.values() for g in j.values())}
    return {**scores, "counts": counts}
