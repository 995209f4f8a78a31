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


def read_manifest(folder: str, expected: str = FORMAT,
                  what: str = "the embedding run") -> dict:
    """``folder``'s manifest.json, checked to be of format ``expected`` (the index's manifest
    is read through here too, with its own format and name)."""
    url = store.join(folder, MANIFEST)
    if not store.exists(url):
        raise InputError(f"{folder}: no {MANIFEST} ({what} is missing or incomplete)")
    manifest = store.read_json(url)
    if manifest.get("format") != expected:
        raise InputError(f"{url}: format {manifest.get('format')!r}, expected {expected!r}")
    return manifest


def read_part(folder: str, part: dict, verify: bool = False) -> tuple[list[str], np.ndarray]:
    """One part's (doc ids, vectors), read once; ``verify`` checks its sha256. Its row count
    must match its manifest entry ``part``."""
    import pyarrow.parquet as pq

    url = store.join(folder, part["file"])
    data = store.read_bytes(url)
    if verify and hashlib.sha256(data).hexdigest() != part["sha256"]:
        raise InputError(f"{url}: sha256 does not match the embeddings manifest")
    ids, vectors = from_table(pq.read_table(pa.BufferReader(data)))
    if len(ids) != part["rows"]:
        raise InputError(f"{url}: {len(ids)} rows, the manifest says {part['rows']}")
    return ids, vectors


def iter_parts(folder: str, verify: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
    """Each part's (doc ids, vectors), in manifest order."""
    for part in read_manifest(folder)["parts"]:
        yield read_part(folder, part, verify)


def read_rows(folder: str, manifest: dict, start: int, stop: int,
              verify: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, vectors) blocks covering rows ``[start, stop)``; reads only the parts needed."""
    offset = 0
    for part in manifest["parts"]:
        rows = int(part["rows"])
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            ids, vectors = read_part(folder, part, verify)
            yield ids[lo - offset:hi - offset], vectors[lo - offset:hi - offset]
        offset += rows
        if offset >= stop:
            break


def _concat(ids: list[str], blocks: list[np.ndarray], dim: int) -> tuple[list[str], np.ndarray]:
    return ids, (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32))


def sample_rows(folder: str, manifest: dict, size: int, seed: int,
                verify: bool = True) -> tuple[list[str], np.ndarray]:
    """A uniform sample (without replacement) of ``size`` rows, in row order."""
    total = int(manifest["rows"])
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(size, total),
                                                        replace=False))
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    offset = 0
    for part in manifest["parts"]:
        rows = int(part["rows"])
        lo, hi = np.searchsorted(picked, [offset, offset + rows])
        if hi > lo:
            part_ids, vectors = read_part(folder, part, verify)
            local = picked[lo:hi] - offset
            ids.extend(part_ids[i] for i in local)
            blocks.append(vectors[local])
        offset += rows
    return _concat(ids, blocks, int(manifest["dim"]))


def load(folder: str, verify: bool = False) -> tuple[list[str], np.ndarray]:
    """All doc ids and vectors of an embedding folder (concatenated in manifest order)."""
    manifest = read_manifest(folder)
    ids: list[str] = []
    blocks: list[np.ndarray] = []
    for part in manifest["parts"]:
        part_ids, vectors = read_part(folder, part, verify)
        ids.extend(part_ids)
        blocks.append(vectors)
    return _concat(ids, blocks, int(manifest["dim"]))


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
