"""Rankings and TREC run files, with trec_eval's ordering.

trec_eval ranks a query's documents by score, descending, and breaks ties by document id,
descending (its ``comp_sim_docno``). Every ranking this project produces (exact search, BM25,
the serve router's merge) uses that same order, so a run file, the metrics computed from it and
an HTTP answer agree on which document is at rank r.
"""

from __future__ import annotations

import heapq
import io
from typing import Iterable

from retriever.io import store

Hit = tuple[str, float]  # (doc_id, score)
Run = dict[str, list[Hit]]  # query id -> hits in rank order
# Searchers fetch this many neighbours beyond k so that a tie at the cut-off is broken by doc
# id (trec_eval's order) rather than by the index's internal order.
TIE_MARGIN = 16


def rank_key(hit: Hit) -> tuple[float, str]:
    """Sort key, used with ``reverse=True``: higher score first, then higher doc id."""
    return (hit[1], hit[0])


def order(hits: Iterable[Hit], k: int | None = None) -> list[Hit]:
    """Hits in trec_eval order, cut to ``k``."""
    if k is None:
        return sorted(hits, key=rank_key, reverse=True)
    return heapq.nlargest(k, hits, key=rank_key)


def merge(partials: Iterable[Iterable[Hit]], k: int) -> list[Hit]:
    """Global top-k of several shards' top-k lists (same order, duplicates kept once)."""
    best: dict[str, float] = {}
    for hits in partials:
        for doc_id, score in hits:
            if doc_id not in best or score > best[doc_id]:
                best[doc_id] = score
    return order(best.items(), k)


def drop_identical_ids(run: Run) -> Run:
    """BEIR's rule for collections whose queries are also documents: ignore qid == docid hits."""
    return {qid: [h for h in hits if h[0] != qid] for qid, hits in run.items()}


def write_trec(run: Run, url: str, tag: str = "retriever") -> None:
    """``qid Q0 docid rank score tag`` lines, ranks from 1, in the run's order."""
    buffer = io.StringIO()
    for qid, hits in run.items():
        for rank, (doc_id, score) in enumerate(hits, start=1):
            buffer.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")
    store.write_text(url, buffer.getvalue())


def read_trec(url: str) -> Run:
    from retriever.io.formats import DataFormatError

    run: Run = {}
    for number, line in enumerate(store.read_text(url).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise DataFormatError(url, f"expected 6 columns (qid Q0 docid rank score tag), "
                                       f"got {len(parts)}", number)
        try:
            score = float(parts[4])
        except ValueError as err:
            raise DataFormatError(url, f"score {parts[4]!r} is not a number", number) from err
        run.setdefault(parts[0], []).append((parts[2], score))
    return {qid: order(hits) for qid, hits in run.items()}
