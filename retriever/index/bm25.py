"""BM25 with bm25s: Lucene's scoring (k1=0.9, b=0.4 as Anserini's BEIR baselines), English
stopwords and the Snowball (Porter2) stemmer. Only documents sharing a term with the query are
returned, as Lucene does; ties are ordered as trec_eval orders them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import bm25s
import numpy as np

from retriever.index.ranking import Hit, order


@dataclass
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str = "english"


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

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        tokens = bm25s.tokenize(list(queries), stopwords=self.config.stopwords,
                                stemmer=self._stemmer, return_ids=False, show_progress=False)
        fetch = min(len(self.ids), k + 16)  # a margin so ties at the cut-off break by doc id
        rows, scores = self._bm25.retrieve(tokens, k=fetch, show_progress=False)
        out = []
        for row, score in zip(np.atleast_2d(rows), np.atleast_2d(scores)):
            hits = [(self.ids[int(r)], float(s)) for r, s in zip(row, score) if s > 0]
            out.append(order(hits, k))
        return out
