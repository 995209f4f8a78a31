"""BM25 with bm25s: Lucene's scoring (k1=0.9, b=0.4 as Anserini's BEIR baselines), English
stopwords and the Snowball (Porter2) stemmer.

:class:`BM25Index` is the one BM25 set-up: passages and their ids in, then either ``search``
(top-k in trec_eval order; only documents sharing a term with the query are returned, as
Lucene does) or ``score_all`` (every document's score, which hard-negative mining needs to
know the positives' scores exactly).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import bm25s
import numpy as np

from retriever.index.ranking import TIE_MARGIN, Hit, order


@dataclass
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str = "english"


@functools.lru_cache(maxsize=None)
def _stemmer(name: str):
    import Stemmer

    return Stemmer.Stemmer(name)


def tokenize(texts: Sequence[str], config: BM25Config) -> list[list[str]]:
    """Each text's terms as BM25 sees them (lower-cased, stopwords removed, stemmed)."""
    return bm25s.tokenize(list(texts), stopwords=config.stopwords,
                          stemmer=_stemmer(config.stemmer) if config.stemmer else None,
                          return_ids=False, show_progress=False)


class BM25Index:
    def __init__(self, passages: Sequence[str], ids: Sequence[str],
                 config: BM25Config | None = None):
        if len(passages) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(passages)} passages")
        import Stemmer

        self.config = config or BM25Config()
        self.ids = list(ids)
        self._stemmer = Stemmer.Stemmer(self.config.stemmer) if self.config.stemmer else None
        self._bm25 = bm25s.BM25(k1=self.config.k1, b=self.config.b, method=self.config.method)
        tokens = bm25s.tokenize(list(passages), stopwords=self.config.stopwords,
                                stemmer=self._stemmer, show_progress=False)
        self._bm25.index(tokens, show_progress=False)

    @classmethod
    def from_columns(cls, scores: dict, terms: Sequence[str], ids: Sequence[str],
                     config: BM25Config | None = None) -> "BM25Index":
        """An index over precomputed per-term score columns: ``scores`` holds bm25s' CSC
        arrays (``data``, ``indices``, ``indptr``; documents x ``terms``), e.g. a shard scored
        with corpus-wide statistics (``retriever.index.sparse``)."""
        index = cls.__new__(cls)
        index.config, index.ids = config or BM25Config(), list(ids)
        index._bm25 = bm25s.BM25(k1=index.config.k1, b=index.config.b,
                                 method=index.config.method)
        index._bm25.scores = {**scores, "num_docs": len(index.ids)}
        index._bm25.vocab_dict = {term: column for column, term in enumerate(terms)}
        index._bm25.unique_token_ids_set = set(range(len(terms)))
        index._bm25.nonoccurrence_array = None
        return index

    def _query_tokens(self, queries: Sequence[str]) -> list[list[str]]:
        return tokenize(queries, self.config)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        fetch = min(len(self.ids), k + TIE_MARGIN)
        rows, scores = self._bm25.retrieve(self._query_tokens(queries), k=fetch,
                                           show_progress=False)
        out = []
        for row, score in zip(np.atleast_2d(rows), np.atleast_2d(scores)):
            hits = [(self.ids[int(r)], float(s)) for r, s in zip(row, score) if s > 0]
            out.append(order(hits, k))
        return out

    def score_all(self, queries: Sequence[str]) -> list[np.ndarray]:
        """Each query's score for every document, in row order (zeros: no term in common)."""
        return [np.asarray(self._bm25.get_scores(t), dtype=np.float32) if t else
                np.zeros(len(self.ids), dtype=np.float32) for t in self._query_tokens(queries)]
