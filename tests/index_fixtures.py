"""Embedding folders for the index and serve tests, made with the library (not the encode job).

``write_embeddings`` writes the embedding dataset format of ``retriever.io.embeddings``
(part-NNNNN.parquet + manifest.json, manifest last). ``scifact_minilm`` encodes SciFact's
corpus and its 300 test queries with MiniLM once and keeps the result under pytest's cache
directory, keyed by the encoder settings (model hash included) and the corpus file's size
and mtime, so test_index.py, test_serve.py and test_browser.py share one encoding (1-2 min on
this machine) and a changed model or corpus is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from retriever import provenance
from retriever.io import embeddings, store
from tests.helpers import dataset as dataset_path


def write_embeddings(folder: str, ids: list[str], vectors: np.ndarray, encoder: dict,
                     dtype: str = "float32", rows_per_part: int = 2000,
                     source: dict | None = None) -> dict:
    """An embedding folder (parts, then the manifest); returns the manifest."""
    parts = []
    for number, start in enumerate(range(0, len(ids), rows_per_part)):
        stop = min(start + rows_per_part, len(ids))
        name = embeddings.part_name(number)
        url = store.join(folder, name)
        store.write_parquet(embeddings.to_table(ids[start:stop], vectors[start:stop], dtype), url)
        parts.append({"file": name, "rows": stop - start, "sha256": embeddings.sha256_of(url)})
    manifest = {"format": embeddings.FORMAT, "encoder": encoder, "dim": int(vectors.shape[1]),
                "dtype": dtype, "parts": parts, "rows": len(ids), "source": source or {},
                "skipped": {}, "code_version": provenance.code_version(),
                "created": provenance.now()}
    store.write_json(store.join(folder, embeddings.MANIFEST), manifest)
    return manifest


@dataclass
class Encoded:
    """SciFact encoded with MiniLM: the embedding folder plus the test queries' vectors."""

    folder: str  # embedding folder URL (local)
    dataset: object  # retriever.io.formats.Dataset
    query_ids: list[str]
    query_vectors: np.ndarray
    settings: dict  # Encoder.settings()


def cache_dir(pytestconfig, tmp_path_factory) -> str:
    """pytest's cache directory for the encoding (a temporary one if the cache is off)."""
    cache = getattr(pytestconfig, "cache", None)
    return str(cache.mkdir("scifact-minilm") if cache is not None
               else tmp_path_factory.mktemp("scifact-minilm"))


def scifact_minilm(cache_dir: str) -> Encoded:
    from retriever.io.formats import load_dataset
    from retriever.modeling.encoder import Encoder, EncoderConfig

    data = load_dataset(dataset_path("scifact"))
    encoder = Encoder(EncoderConfig(model="minilm"))
    settings = encoder.settings()
    corpus_file = data.files["corpus"]
    stat = os.stat(corpus_file)
    key = hashlib.sha256(json.dumps([settings, stat.st_size, stat.st_mtime_ns],
                                    sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"scifact-minilm-{key}")
    queries = data.judged_queries()
    query_file = os.path.join(folder, "queries.npy")
    if not (os.path.exists(os.path.join(folder, embeddings.MANIFEST))
            and os.path.exists(query_file)):
        vectors = encoder.encode_passages(data.corpus.passages())
        write_embeddings(folder, data.corpus.ids, vectors, settings,
                         source={"corpus": corpus_file})
        np.save(query_file + ".tmp.npy", encoder.encode_queries(list(queries.values())))
        os.replace(query_file + ".tmp.npy", query_file)
    return Encoded(folder, data, list(queries), np.load(query_file), settings)
