"""Retrieval metrics with trec_eval semantics, computed by pytrec_eval.

NDCG@10 (``ndcg_cut_10``), MRR@10 (``recip_rank`` over each ranking cut to its top 10),
Recall@100 and Recall@1000 (``recall_100``, ``recall_1000``). Documents graded >= 1 are
relevant; NDCG uses the grades as gains, as trec_eval does. Averages are over every judged
query that has at least one relevant document; a query the run does not answer counts as 0
(trec_eval ``-c``).
"""

from __future__ import annotations

import pytrec_eval

from retriever.io.formats import Qrels
from retriever.index.ranking import Run, order

METRICS = {"ndcg@10": "ndcg_cut_10", "mrr@10": "recip_rank", "recall@100": "recall_100",
           "recall@1000": "recall_1000"}


def _as_scores(run: Run, cut: int | None = None) -> dict[str, dict[str, float]]:
    return {qid: {doc: score for doc, score in order(hits, cut)} for qid, hits in run.items()}


def per_query(qrels: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """metric name -> {query id -> value} over the queries that have a relevant document."""
    scored = {qid: judged for qid, judged in qrels.items() if any(g > 0 for g in judged.values())}
    main = pytrec_eval.RelevanceEvaluator(scored, {"ndcg_cut_10", "recall_100", "recall_1000"})
    top10 = pytrec_eval.RelevanceEvaluator(scored, {"recip_rank"})
    full, cut = main.evaluate(_as_scores(run)), top10.evaluate(_as_scores(run, 10))
    out: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    for qid in scored:
        for name, measure in METRICS.items():
            source = cut if measure == "recip_rank" else full
            out[name][qid] = float(source.get(qid, {}).get(measure, 0.0))
    return out


def evaluate(qrels: Qrels, run: Run) -> dict[str, float]:
    """Mean of each metric over the judged queries (see the module docstring)."""
    table = per_query(qrels, run)
    return {name: (sum(values.values()) / len(values) if values else 0.0)
            for name, values in table.items()}
