"""Synthetic data for scale tests, generated on demand (never committed), deterministic by seed.

**Corpus** (:func:`write_corpus`): ``docs`` documents ``{"_id", "title", "text"}`` written as
JSONL into ``files`` files ``part-NNN.jsonl`` under a folder URL, streamed (one chunk of
documents in memory at a time). Text and title lengths in words are drawn from SciFact's
length distribution (:data:`SCIFACT_TEXT_WORDS`, :data:`SCIFACT_TITLE_WORDS`: its quantiles,
sampled by inverse CDF with linear interpolation); words come from a synthetic vocabulary of
``vocab`` pronounceable words with Zipfian frequencies (rank ``r`` has weight ``r**-zipf``;
natural text has an exponent near 1, Zipf 1949). Ids are ``d<number>``; document ``i`` depends
only on ``seed`` and ``i``'s chunk, so the same arguments always write the same bytes.

**Vectors** (:func:`clustered_vectors`, :func:`clustered_vector_chunks`): float32 rows,
L2-normalised, from a Gaussian mixture of ``centres`` random unit centres with per-dimension
noise ``spread / sqrt(dim)`` (so a point sits about ``spread`` from its centre, the centres
about 1.41 apart). Uniform random vectors would make IVF meaningless (no cluster structure to
partition); a mixture with a few thousand centres is the usual stand-in (e.g. the ANN
benchmarks' synthetic sets). Rows are made in blocks of :data:`BLOCK`, block ``b`` from seed
``(seed, stream, b)``: any chunking of the stream concatenates to the same array, and
``stream=1`` (:func:`clustered_queries`) gives held-out points of the same mixture.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from retriever.io import store

# SciFact (BEIR) corpus, 5,183 docs: word counts (whitespace split) at the 0, 5, ..., 100th
# percentiles of "text", and at the 0, 10, ..., 100th of "title".
SCIFACT_TEXT_WORDS = (26, 98, 116, 128, 140, 147, 151, 158, 169, 181, 192, 200, 208, 221, 235,
                      247, 255, 269, 295, 341, 1524)
SCIFACT_TITLE_WORDS = (1, 7, 9, 10, 11, 12, 14, 15, 16, 19, 40)
CHUNK_DOCS = 10_000
BLOCK = 65_536
TABLE = 1 << 22  # Zipf lookup table size (ranks rarer than 1 in 4M are merged into neighbours)
SYLLABLES = [c + v for c in "bdfghjklmnprstvz" for v in "aeiou"]  # 80 syllables


def vocabulary(size: int) -> np.ndarray:
    """``size`` distinct words of 1-4 syllables, most frequent (shortest) first."""
    words, length = [], 1
    while len(words) < size:
        total = len(SYLLABLES) ** length
        for n in range(min(total, size - len(words))):
            word = ""
            for _ in range(length):
                n, k = divmod(n, len(SYLLABLES))
                word += SYLLABLES[k]
            words.append(word)
        length += 1
    return np.array(words, dtype=object)


def sample_lengths(rng: np.random.Generator, quantiles: tuple[int, ...], n: int) -> np.ndarray:
    """``n`` lengths by inverse CDF over evenly spaced quantiles."""
    levels = np.linspace(0.0, 1.0, len(quantiles))
    return np.maximum(1, np.rint(np.interp(rng.random(n), levels, quantiles))).astype(np.int64)


class DocumentMaker:
    """Documents ``start .. start + n`` of the synthetic corpus for ``seed``."""

    def __init__(self, seed: int = 0, vocab: int = 50_000, zipf: float = 1.07):
        self.seed, self.words = seed, vocabulary(vocab)
        weights = np.arange(1, vocab + 1, dtype=np.float64) ** -zipf
        cdf = np.cumsum(weights) / weights.sum()
        # Inverse-CDF lookup table: a uniform integer -> a word rank, O(1) a sample.
        self.table = np.minimum(np.searchsorted(cdf, (np.arange(TABLE) + 0.5) / TABLE),
                                vocab - 1).astype(np.int32)

        self.sizes = np.array([len(w) + 1 for w in self.words], np.int64)  # with its space

    def chunk(self, start: int, n: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, start])
        lengths = np.empty(2 * n, np.int64)  # title, text, title, text, ...
        lengths[0::2] = sample_lengths(rng, SCIFACT_TITLE_WORDS, n)
        lengths[1::2] = sample_lengths(rng, SCIFACT_TEXT_WORDS, n)
        picks = self.table[rng.integers(0, TABLE, int(lengths.sum()))]
        # One join for the whole chunk, then each field is a slice of it (fast).
        flat = " ".join(self.words[picks].tolist()) + " "
        ends = np.cumsum(self.sizes[picks])[np.cumsum(lengths) - 1]
        starts = np.concatenate([[0], ends[:-1]])
        fields = [flat[a:b - 1] for a, b in zip(starts.tolist(), ends.tolist())]
        return [{"_id": f"d{start + i}", "title": fields[2 * i].capitalize(),
                 "text": fields[2 * i + 1]} for i in range(n)]


def write_corpus(folder: str, docs: int, files: int = 4, seed: int = 0,
                 vocab: int = 50_000, zipf: float = 1.07) -> list[str]:
    """Write the corpus into ``folder`` (``part-NNN.jsonl``, documents split evenly in
    order); returns the file URLs. Memory: one chunk of :data:`CHUNK_DOCS` documents."""
    if docs < 1 or files < 1:
        raise ValueError(f"docs and files must be >= 1, got {docs} and {files}")
    maker = DocumentMaker(seed, vocab, zipf)
    bounds = np.linspace(0, docs, min(files, docs) + 1).astype(np.int64)
    urls = []
    for f in range(len(bounds) - 1):
        url = store.join(folder, f"part-{f:03d}.jsonl")
        with store.open_write(url, "wb") as handle:
            for start in range(int(bounds[f]), int(bounds[f + 1]), CHUNK_DOCS):
                n = min(CHUNK_DOCS, int(bounds[f + 1]) - start)
                handle.write("".join(json.dumps(d) + "\n"
                                     for d in maker.chunk(start, n)).encode())
        urls.append(url)
    return urls


def _centres(dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2**32 - 1])
    points = rng.standard_normal((centres, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def clustered_vector_chunks(n: int, dim: int = 128, centres: int = 2000, seed: int = 0,
                            chunk: int = BLOCK, spread: float = 0.5,
                            stream: int = 0) -> Iterator[np.ndarray]:
    """The first ``n`` rows of the mixture's stream, ``chunk`` rows at a time."""
    if n < 0 or chunk < 1:
        raise ValueError(f"n must be >= 0 and chunk >= 1, got {n} and {chunk}")
    means = _centres(dim, centres, seed)
    pending: list[np.ndarray] = []
    have = 0
    for block in range((n + BLOCK - 1) // BLOCK):
        rows = min(BLOCK, n - block * BLOCK)
        rng = np.random.default_rng([seed, stream, block])
        which = rng.integers(0, centres, rows)
        noise = rng.standard_normal((rows, dim), dtype=np.float32)
        points = means[which] + noise * np.float32(spread / np.sqrt(dim))
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        pending.append(points.astype(np.float32, copy=False))
        have += rows
        while have >= chunk or (have and block == (n - 1) // BLOCK):
            joined = np.concatenate(pending)
            yield joined[:chunk]
            pending, have = [joined[chunk:]], len(joined) - min(chunk, len(joined))
            if not have:
                pending = []


def clustered_vectors(n: int, dim: int = 128, centres: int = 2000, seed: int = 0,
                      spread: float = 0.5) -> np.ndarray:
    """``n`` rows of the mixture (data: stream 0)."""
    chunks = list(clustered_vector_chunks(n, dim, centres, seed, BLOCK, spread))
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


def clustered_queries(n: int, dim: int = 128, centres: int = 2000, seed: int = 0,
                      spread: float = 0.5) -> np.ndarray:
    """``n`` held-out rows of the same mixture (stream 1: never among the data rows)."""
    chunks = list(clustered_vector_chunks(n, dim, centres, seed, BLOCK, spread, stream=1))
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
