"""The embedding dataset format: parquet parts plus a JSON manifest, written last.

Layout under one folder URL::

    part-00000.parquet ...   doc_id: string, embedding: fixed_size_list<float16|float32>[dim]
    manifest.json            written only when every part is complete

Manifest keys: ``format`` ("retriever.embeddings/1"), ``encoder`` (Encoder.settings(): model,
model_hash, pooling, prefixes, normalisation, dims, dtype), ``dim``, ``dtype``, ``parts``
(list of {"file", "rows", "sha256"}), ``rows``, ``source`` (corpus URL and its fingerprint),
``skipped`` (bad-input counts), ``code_version``, ``created``.
Nothing here is pickled: parquet and JSON are safe to load from shared storage.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa

from retriever.io import store
from retriever.provenance import code_version, now
from retriever.errors import InputError

FORMAT = "retriever.embeddings/1"
MANIFEST = "manifest.json"
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def to_table(doc_ids: list[str], vectors: np.ndarray, dtype: str = "float32") -> pa.Table:
    """A parquet-ready table: ``doc_id`` strings and fixed-size-list embeddings."""
    if dtype not in DTYPES:
        raise InputError(f"embedding dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "float16"
                                   else np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(doc_ids):
        raise ValueError(f"{len(doc_ids)} ids for vectors of shape {vectors.shape}")
    values = pa.array(vectors.reshape(-1), type=DTYPES[dtype])
    embedding = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])
    return pa.table({"doc_id": pa.array(doc_ids, pa.string()), "embedding": embedding})


def from_table(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """(doc ids, float32 matrix) from a table written by :func:`to_table`."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return table.column("doc_id").to_pylist(), flat.reshape(-1, dim).astype(np.float32,
                                                                            copy=False)


def sha256_of(url: str) -> str:
    return hashlib.sha256(store.read_bytes(url)).hexdigest()


def read_manifest(folder: str) -> dict:
    url = store.join(folder, MANIFEST)
    if not store.exists(url):
        raise InputError(f"{folder}: no {MANIFEST} (the embedding run is missing or incomplete)")
    manifest = store.read_json(url)
    if manifest.get("format") != FORMAT:
        raise InputError(f"{url}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def iter_parts(folder: str, verify: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
    """Each part's (doc ids, vectors), in manifest order; ``verify`` checks sha256 and rows."""
    manifest = read_manifest(folder)
    for part in manifest["parts"]:
        url = store.join(folder, part["file"])
        if verify and sha256_of(url) != part["sha256"]:
            raise InputError(f"{url}: sha256 does not match the manifest")
        ids, vectors = from_table(store.read_parquet(url))
        if len(ids) != part["rows"]:
            raise InputError(f"{url}: {len(ids)} rows, manifest says {part['rows']}")
        yield ids, vectors


def load(folder: str, verify: bool = False) -> tuple[list[str], np.ndarray]:
    """All doc ids and vectors of an embedding folder (concatenated in manifest order)."""
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for part_ids, vectors in iter_parts(folder, verify):
        ids.extend(part_ids)
        blocks.append(vectors)
    manifest = read_manifest(folder)
    dim = int(manifest["dim"])
    return ids, (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32))


def table_bytes(table: pa.Table) -> bytes:
    """A table serialised as one parquet file, in memory."""
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_part(folder: str, index: int, doc_ids: list[str], vectors: np.ndarray,
               dtype: str = "float32") -> dict:
    """Write ``part-<index>.parquet`` in one piece (atomic locally, one upload on object
    stores); returns its manifest entry ``{"file", "rows", "sha256", "bytes"}``."""
    data = table_bytes(to_table(doc_ids, vectors, dtype))
    name = part_name(index)
    store.write_bytes(store.join(folder, name), data)
    return {"file": name, "rows": len(doc_ids), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data)}


def write_manifest(folder: str, *, encoder: dict, parts: list[dict], dtype: str,
                   source: dict | None = None, skipped: dict | None = None,
                   **extra) -> dict:
    """Write ``manifest.json`` for parts already complete (call it last); returns it.

    ``parts`` are :func:`write_part` entries in order; ``extra`` keys are added as given.
    """
    if dtype not in DTYPES:
        raise InputError(f"embedding dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    manifest = {"format": FORMAT, "encoder": encoder, "dim": int(encoder["dim"]),
                "dtype": dtype, "parts": parts, "rows": sum(int(p["rows"]) for p in parts),
                "source": source or {}, "skipped": skipped or {},
                "code_version": code_version(), "created": now(), **extra}
    store.write_json(store.join(folder, MANIFEST), manifest)
    return manifest
