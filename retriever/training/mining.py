"""Hard-negative mining: BM25 and dense candidates, positives excluded, false negatives
filtered, fused, and sampled from a rank window.

For every judged training query with at least one positive (grade >= ``min_relevance``):

1. **Candidates** from BM25 (bm25s, Lucene scoring, the project's BM25 settings) and from a
   dense model (the Encoder + exact search), ``bm25_depth`` / ``dense_depth`` each; either
   source can be switched off. Judged positives are never candidates; documents judged
   non-relevant stay (they are true negatives).
2. **False-negative filter** (positive-aware, as NV-Retriever's "TopK-PercPos", Moreira et al.
   2024): a document that any source scores above ``false_negative_margin`` x that source's
   score for the query's best positive is dropped from every list, as probably relevant but
   unjudged (BM25 skips the rule for a query whose positives share no term with it).
3. **Fusion**: reciprocal rank fusion (``1 / (rrf_k + rank)`` summed over sources) of the
   filtered lists; ties in trec_eval order (doc id descending).
4. **Window**: ``num_negatives`` documents sampled (seeded per query) from fused ranks
   ``[window_start, window_end)``, kept in rank order; skipping the very top (window_start > 0)
   is a further guard against false negatives.

The result is a list of :class:`retriever.io.formats.TrainingExample` (positives and negatives as
passage text plus their ids) and counts that describe what the filter and window did.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from retriever.config import flat, to_dict
from retriever.index.bm25 import BM25Config, BM25Index
from retriever.io.formats import Dataset, TrainingExample
from retriever.index.ranking import TIE_MARGIN, Hit, order
from retriever.modeling.encoder import EncoderConfig


@dataclass
class MiningConfig:
    """How candidates are found, filtered, fused and sampled. The dense model's options are the
    Encoder's own, named ``dense_*``: ``dense_model`` ('none': no dense candidates),
    ``dense_batch_size``, ``dense_dtype``, ``dense_query_dtype``."""

    bm25_depth: int = field(default=100, metadata={"help": "BM25 candidates per query (0: off)"})
    dense: EncoderConfig = flat(EncoderConfig, prefix="dense_",
                                only=("model", "batch_size", "dtype", "query_dtype"))
    dense_depth: int = field(default=100, metadata={"help": "dense candidates per query"})
    num_negatives: int = field(default=16, metadata={"help": "negatives kept per query"})
    window_start: int = field(default=0, metadata={
        "help": "first fused rank (0-based) negatives are sampled from"})
    window_end: int = field(default=60, metadata={"help": "fused rank the window ends before"})
    false_negative_margin: float | None = field(default=0.95, metadata={
        "help": "drop candidates that any source scores above this x its best positive's score; "
                "0 disables the filter"})
    min_relevance: int = field(default=1, metadata={"help": "lowest grade that is a positive"})
    rrf_k: int = field(default=60, metadata={"help": "reciprocal rank fusion constant"})
    seed: int = 0

    @property
    def dense_model(self) -> str | None:
        """The dense model, or None when dense candidates are off."""
        return None if self.dense.model in (None, "", "none", "None") else self.dense.model

    def to_dict(self) -> dict:
        return to_dict(self)

    def __post_init__(self):
        if self.bm25_depth < 0 or self.dense_depth < 0:
            raise ValueError("bm25_depth and dense_depth must be >= 0")
        if not self.bm25_depth and not (self.dense_model and self.dense_depth):
            raise ValueError("no candidate source: set bm25_depth > 0 or a dense_model")
        if not 0 <= self.window_start < self.window_end:
            raise ValueError(f"rank window [{self.window_start}, {self.window_end}) is empty")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.false_negative_margin is not None and self.false_negative_margin < 0:
            raise ValueError("false_negative_margin must be >= 0 (0 or None disables it)")
        if not self.false_negative_margin:
            self.false_negative_margin = None


# ---------------------------------------------------------------------------- sources

def _top(scores: np.ndarray, ids: list[str], depth: int, exclude: set[int]) -> list[Hit]:
    """Top ``depth`` (score > 0 for BM25 is applied by the caller) without excluded rows."""
    fetch = min(len(ids), depth + len(exclude) + TIE_MARGIN)
    rows = np.argpartition(-scores, fetch - 1)[:fetch] if fetch < len(ids) else \
        np.arange(len(ids))
    hits = [(ids[int(r)], float(scores[int(r)])) for r in rows if int(r) not in exclude]
    return order(hits, depth)


def _rrf(lists: list[list[Hit]], k: int) -> list[str]:
    fused: dict[str, float] = {}
    for hits in lists:
        for rank, (doc_id, _) in enumerate(hits):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank + 1)
    return [doc_id for doc_id, _ in order(fused.items())]


def _query_rng(seed: int, qid: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{qid}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------- mining

Candidates = list[tuple[str, np.ndarray, list[Hit]]]  # (source, every doc's score, top hits)


@dataclass
class _Sources:
    """Every document's score for each query, from each candidate source that is on."""

    bm25: list[np.ndarray] | None = None
    dense_docs: np.ndarray | None = None
    dense_queries: np.ndarray | None = None
    dense_settings: dict | None = None

    def for_query(self, n: int, config: MiningConfig) -> list[tuple[str, np.ndarray, int]]:
        """(source, scores of every document, depth) for query ``n``."""
        sources = []
        if self.bm25 is not None:
            sources.append(("bm25", self.bm25[n], config.bm25_depth))
        if self.dense_queries is not None:
            sources.append(("dense", self.dense_docs @ self.dense_queries[n], config.dense_depth))
        return sources


def _score_sources(passages: list[str], ids: list[str], texts: list[str], config: MiningConfig,
                   encoder=None) -> _Sources:
    sources = _Sources()
    if config.bm25_depth:
        sources.bm25 = BM25Index(passages, ids).score_all(texts)
    if config.dense_model and config.dense_depth:
        if encoder is None:
            from retriever.modeling.encoder import Encoder

            encoder = Encoder(config.dense)
        sources.dense_docs = encoder.encode_passages(passages)
        sources.dense_queries = encoder.encode_queries(texts)
        sources.dense_settings = encoder.settings()
    return sources


def _candidates(sources: list[tuple[str, np.ndarray, int]], ids: list[str], exclude: set[int],
                stats: dict) -> Candidates:
    tops = []
    for name, scores, depth in sources:
        hits = _top(scores, ids, depth, exclude)
        if name == "bm25":
            hits = [h for h in hits if h[1] > 0]  # no shared term: not a BM25 candidate
        stats[f"candidates_{name}"] += len(hits)
        tops.append((name, scores, hits))
    return tops


def _likely_false_negatives(tops: Candidates, positive_rows: set[int], row_of: dict[str, int],
                            margin: float | None) -> set[str]:
    """Candidates that any source scores above ``margin`` x its best positive's score."""
    flagged: set[str] = set()
    if margin is None:
        return flagged
    union = {doc_id for _, _, hits in tops for doc_id, _ in hits}
    for _, scores, _ in tops:
        best = max(float(scores[r]) for r in positive_rows)
        if best > 0:
            flagged.update(d for d in union if float(scores[row_of[d]]) > margin * best)
    return flagged


def _negatives(tops: Candidates, flagged: set[str], config: MiningConfig, qid: str,
               stats: dict) -> list[str]:
    """The unflagged candidates fused, cut to the window, and sampled (seeded per query)."""
    lists = []
    for name, _, hits in tops:
        kept = [h for h in hits if h[0] not in flagged]
        stats[f"filtered_{name}"] += len(hits) - len(kept)
        lists.append(kept)
    fused = _rrf(lists, config.rrf_k)[config.window_start:config.window_end]
    if len(fused) <= config.num_negatives:
        return fused
    picks = sorted(_query_rng(config.seed, qid).choice(
        len(fused), size=config.num_negatives, replace=False).tolist())
    return [fused[i] for i in picks]


def mine(dataset: Dataset, config: MiningConfig, encoder=None) -> tuple[
        list[TrainingExample], dict]:
    """Training examples with mined negatives for ``dataset``'s judged queries.

    ``encoder``: an :class:`retriever.modeling.encoder.Encoder` for the dense source (built from
    ``config.dense_model`` when not given).
    """
    corpus = dataset.corpus
    passages = corpus.passages()
    row_of = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    queries = dataset.judged_queries()
    qids = [q for q in queries
            if any(g >= config.min_relevance for g in dataset.qrels[q].values())]
    sources = _score_sources(passages, corpus.ids, [queries[q] for q in qids], config, encoder)
    examples: list[TrainingExample] = []
    stats = {"queries": len(queries), "trained_queries": 0,
             "skipped_no_positive": len(queries) - len(qids), "candidates_bm25": 0,
             "candidates_dense": 0, "filtered_bm25": 0, "filtered_dense": 0,
             "short_of_negatives": 0, "negatives": 0, "positives": 0}
    for n, qid in enumerate(qids):
        judged = dataset.qrels[qid]
        positives = [d for d, g in judged.items() if g >= config.min_relevance and d in row_of]
        exclude = {row_of[d] for d in positives}
        tops = _candidates(sources.for_query(n, config), corpus.ids, exclude, stats)
        flagged = _likely_false_negatives(tops, exclude, row_of, config.false_negative_margin)
        negatives = _negatives(tops, flagged, config, qid, stats)
        stats["short_of_negatives"] += len(negatives) < config.num_negatives
        stats["trained_queries"] += 1
        stats["negatives"] += len(negatives)
        stats["positives"] += len(positives)
        examples.append(TrainingExample(
            query=queries[qid], query_id=qid,
            positives=[passages[row_of[d]] for d in positives], positive_ids=positives,
            negatives=[passages[row_of[d]] for d in negatives], negative_ids=negatives))
    settings = {**config.to_dict(), "bm25": asdict(BM25Config()),
                "dense": sources.dense_settings}
    return examples, {"stats": stats, "settings": settings}
