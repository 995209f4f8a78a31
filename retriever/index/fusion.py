"""Hybrid retrieval: one ranking from a dense and a sparse (BM25) ranking of the same query.

In: two rankings (lists of ``(doc_id, score)`` hits in trec_eval order), each already the
GLOBAL top-``depth(k)`` of its kind (every shard's answer merged by ``ranking.merge``); out:
the fused top-``k``, in trec_eval order (score descending, then doc id descending:
``ranking.order``), so ties are broken by doc id and the result is deterministic.

Methods (:class:`FusionConfig`):

- ``rrf``, reciprocal rank fusion (Cormack, Clarke and Büttcher, "Reciprocal Rank Fusion
  outperforms Condorcet and individual Rank Learning Methods", SIGIR 2009):
  ``score(d) = sum over rankings r containing d of 1 / (rrf_k + rank_r(d))``, ranks from 1,
  ``rrf_k`` = 60 as in the paper. Scores of the input rankings are ignored, only ranks count.
- ``weighted``: each ranking's scores min-max normalised to [0, 1] per query (over the hits it
  returned; all-equal scores normalise to 1), then ``weight * dense + (1 - weight) * sparse``;
  a document missing from a ranking contributes 0 from it.

A hybrid model is named ``bm25+<dense model>`` (``bm25+minilm``): :func:`hybrid_dense_model`.

The default is ``rrf`` with the paper's k=60, not tuned here. On the classic matrix
(``configs/evaluate/classic.yaml``, 2026-11-30; the 4 collections that finished on the busy
shared machine: SciFact, Cranfield, CISI, Medline) BM25 + MiniLM by RRF k=60 averages NDCG@10
0.5927 against BM25's 0.5167 and MiniLM's 0.5593, above both on every one of them; fusing the
same stored runs offline, RRF k in 10..100 gives 0.589-0.594 and ``weighted`` 0.571-0.598 for
dense weights 0.3-0.7, so neither the method nor k was chosen for these numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from retriever.errors import InputError
from retriever.index.ranking import Hit, order

METHODS = ("rrf", "weighted")
HYBRID_PREFIX = "bm25+"
# Hits fetched per ranking before fusing: a document ranked below this in one ranking
# cannot rise into the fused top-k unless it is high in the other.
MIN_DEPTH = 100


@dataclass(frozen=True)
class FusionConfig:
    """How two rankings are fused: ``rrf`` (with ``rrf_k``) or ``weighted`` (``weight`` is
    the dense ranking's share, the sparse ranking gets ``1 - weight``)."""

    method: str = "rrf"
    rrf_k: int = 60
    weight: float = 0.5

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"fusion {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.rrf_k < 0:
            raise InputError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if not 0.0 <= self.weight <= 1.0:
            raise InputError(f"hybrid weight must be in [0, 1], got {self.weight}")

    def settings(self) -> dict:
        """What decides the fused ranking (recorded with runs and in cell keys)."""
        if self.method == "rrf":
            return {"fusion": "rrf", "rrf_k": self.rrf_k}
        return {"fusion": "weighted", "hybrid_weight": self.weight}


def depth(k: int) -> int:
    """Hits to fetch from each (globally merged) ranking for a fused top-``k``."""
    return max(k, MIN_DEPTH)


def hybrid_dense_model(name: str) -> str | None:
    """The dense model of a hybrid model name (``bm25+minilm`` -> ``minilm``), None for a name
    that is not hybrid; a malformed one is an error naming it."""
    if not name.startswith(HYBRID_PREFIX):
        return None
    dense = name[len(HYBRID_PREFIX):].strip()
    if not dense or dense == "bm25" or dense.startswith(HYBRID_PREFIX):
        raise InputError(f"hybrid model {name!r}: expected bm25+<dense model>, e.g. "
                         "bm25+minilm")
    return dense


def _rrf(rankings: list[list[Hit]], rrf_k: int) -> dict[str, float]:
    fused: dict[str, float] = {}
    for hits in rankings:
        for rank, (doc_id, _) in enumerate(order(hits), start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (rrf_k + rank)
    return fused


def _min_max(hits: list[Hit]) -> dict[str, float]:
    if not hits:
        return {}
    low, high = min(s for _, s in hits), max(s for _, s in hits)
    span = high - low
    return {doc_id: (score - low) / span if span > 0 else 1.0 for doc_id, score in hits}


def _weighted(dense: list[Hit], sparse: list[Hit], weight: float) -> dict[str, float]:
    fused: dict[str, float] = {}
    for share, normalised in ((weight, _min_max(dense)), (1.0 - weight, _min_max(sparse))):
        for doc_id, score in normalised.items():
            fused[doc_id] = fused.get(doc_id, 0.0) + share * score
    return fused


def fuse(dense: list[Hit], sparse: list[Hit], k: int, config: FusionConfig) -> list[Hit]:
    """The fused top-``k`` of one query's dense and sparse rankings (trec_eval order)."""
    if config.method == "rrf":
        fused = _rrf([dense, sparse], config.rrf_k)
    else:
        fused = _weighted(dense, sparse, config.weight)
    return order(fused.items(), k)


def fuse_all(dense: list[list[Hit]], sparse: list[list[Hit]], k: int,
             config: FusionConfig) -> list[list[Hit]]:
    """:func:`fuse` for each query of a batch (the two lists in the same query order)."""
    if len(dense) != len(sparse):
        raise ValueError(f"{len(dense)} dense rankings for {len(sparse)} sparse ones")
    return [fuse(d, s, k, config) for d, s in zip(dense, sparse)]
