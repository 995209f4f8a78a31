"""Deterministic query splits of a test collection (e.g. Cranfield's 225 queries into
150 train / 75 test), written as a BEIR folder that every job reads unchanged.

A judged query goes to a split by the rank of ``sha256(f"{seed}:{query_id}")`` among all judged
queries: the assignment depends only on the ids and the seed (not on file order, not on the
machine), and the split sizes are exact (``round(n x fraction)``). The output folder holds the
corpus, ``queries_<split>.jsonl`` and ``qrels/<split>.tsv`` per split, so
``retriever eval --dataset FOLDER`` scores the held-out ``test`` queries and
``retriever mine --dataset FOLDER --split train`` sees only the training ones; a query's text is
only in its own split's file.
"""

from __future__ import annotations

import hashlib
import io
import json

from retriever.io import store
from retriever.io.formats import Dataset, write_qrels


def _key(seed: int, qid: str) -> str:
    return hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest()


def assign(query_ids: list[str], fractions: dict[str, float], seed: int = 0,
           rest: str = "train") -> dict[str, list[str]]:
    """Query ids per split: ``fractions`` (e.g. ``{"test": 1/3}``) take exact shares in hash
    order, ``rest`` takes what is left. Ids come back in numeric-aware id order."""
    if rest in fractions:
        raise ValueError(f"split {rest!r} takes the remainder; give it no fraction")
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or total >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got {fractions}")
    ordered = sorted(set(query_ids), key=lambda q: _key(seed, q))
    out: dict[str, list[str]] = {}
    start = 0
    for name, fraction in fractions.items():
        size = round(len(ordered) * fraction)
        out[name] = ordered[start:start + size]
        start += size
    out[rest] = ordered[start:]
    natural = lambda q: (0, int(q), q) if q.isdigit() else (1, 0, q)  # noqa: E731
    return {name: sorted(ids, key=natural) for name, ids in out.items()}


def split_queries(dataset: Dataset, test_fraction: float, seed: int = 0,
                  dev_fraction: float = 0.0) -> dict[str, Dataset]:
    """Train / (dev) / test Datasets over the same corpus, from ``dataset``'s judged queries."""
    fractions = {"test": test_fraction}
    if dev_fraction:
        fractions["dev"] = dev_fraction
    ids = assign(list(dataset.judged_queries()), fractions, seed)
    return {name: Dataset(name=dataset.name, corpus=dataset.corpus,
                          queries={q: dataset.queries[q] for q in qids},
                          qrels={q: dataset.qrels[q] for q in qids}, split=name,
                          source=dataset.source, files=dataset.files)
            for name, qids in ids.items()}


def _corpus_bytes(dataset: Dataset) -> tuple[str, bytes]:
    """The corpus file as it came (BEIR), or the corpus re-serialised as BEIR JSONL."""
    source = dataset.files.get("corpus", "")
    name = source.rsplit("/", 1)[-1]
    if name in ("corpus.jsonl", "corpus.jsonl.gz"):
        return name, store.read_bytes(source)
    buffer = io.StringIO()
    c = dataset.corpus
    for doc_id, title, text in zip(c.ids, c.titles, c.texts):
        buffer.write(json.dumps({"_id": doc_id, "title": title, "text": text},
                                ensure_ascii=False) + "\n")
    return "corpus.jsonl", buffer.getvalue().encode("utf-8")


def write_split(splits: dict[str, Dataset], out: str, settings: dict) -> dict:
    """Write the BEIR folder and its ``manifest.json`` (last); returns the manifest."""
    first = next(iter(splits.values()))
    corpus_name, corpus = _corpus_bytes(first)
    store.write_bytes(store.join(out, corpus_name), corpus)
    counts = {}
    for name, part in splits.items():
        lines = "".join(json.dumps({"_id": q, "text": t}, ensure_ascii=False) + "\n"
                        for q, t in part.queries.items())
        store.write_text(store.join(out, f"queries_{name}.jsonl"), lines)
        write_qrels(part.qrels, store.join(out, "qrels", f"{name}.tsv"))
        counts[name] = {"queries": len(part.queries),
                        "judged_pairs": sum(len(j) for j in part.qrels.values())}
    manifest = {"kind": "split", "source": first.source, "source_split": settings.get("split"),
                "corpus": corpus_name, "docs": len(first.corpus), "counts": counts,
                "query_ids": {name: list(part.queries) for name, part in splits.items()},
                "settings": settings, "rule": "rank of sha256(f'{seed}:{query_id}')"}
    store.write_json(store.join(out, "manifest.json"), manifest)
    return manifest
