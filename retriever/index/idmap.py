"""A shard's id map (row r of a FAISS shard -> its doc id), held without Python objects.

In: the ``doc_id`` column of a shard's ``shard-NNNNN.ids.parquet`` (or any sequence of str).
Out: :class:`IdMap`: ``len()``, ``take(rows) -> list[str]`` (many rows in one vectorised
lookup), ``ids[r]``.

Format: one pyarrow string array, i.e. Arrow's variable-size binary layout (an offsets buffer of
n + 1 int32 and one UTF-8 data buffer; https://arrow.apache.org/docs/format/Columnar.html):
about 4 bytes plus the id's own length per id, against ~70 bytes an id for a ``list[str]``.
Invariants: one chunk (so a lookup never concatenates), no nulls, ``large_string`` (int64
offsets) only when the ids exceed 2 GiB.

Memory-mapped form (:func:`write_mapped` / :func:`open_mapped`): an uncompressed Arrow IPC
file (one record batch, one ``doc_id`` column) opened with ``pyarrow.memory_map``; IPC reads
from a memory map are zero-copy, so the ids stay in the page cache, not in the process' own
(anonymous) memory. Its schema metadata records ``source_sha256`` (the parquet id map it was
made from, as the index manifest names it) and ``content_sha256`` (sha256 of the array's
type, length and buffers), so a copy is reused only when it is the named id map's copy and,
when checked, its bytes are the ones written.
"""

from __future__ import annotations

import hashlib
import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from retriever.errors import InputError

COLUMN = "doc_id"


class IdMap:
    """Doc ids by row, as one pyarrow string array (see the module docstring)."""

    def __init__(self, array: pa.Array, name: str = "id map"):
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            raise InputError(f"{name}: doc ids must be strings, got {array.type}")
        if array.null_count:
            raise InputError(f"{name}: {array.null_count} doc ids are null")
        self.array = array

    @classmethod
    def of(cls, ids: "Sequence[str] | IdMap") -> "IdMap":
        """``ids`` as an id map (an IdMap is returned as is)."""
        return ids if isinstance(ids, IdMap) else cls(pa.array(ids, pa.string()))

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, row: int) -> str:
        return self.array[row].as_py()

    def take(self, rows: np.ndarray) -> list[str]:
        """The ids of ``rows`` (ints in ``[0, len)``), in that order."""
        return self.array.take(np.asarray(rows, dtype=np.int64)).to_pylist()

    def to_pylist(self) -> list[str]:
        return self.array.to_pylist()

    @property
    def nbytes(self) -> int:
        return self.array.nbytes


def lookup(ids: "Sequence[str] | IdMap", rows: np.ndarray) -> list[str]:
    """``[ids[r] for r in rows]`` in one step for an IdMap, or a plain sequence of ids."""
    if isinstance(ids, IdMap):
        return ids.take(rows)
    return [ids[r] for r in rows.tolist()]


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], column.type)
    try:
        return column.combine_chunks()
    except pa.ArrowInvalid:  # int32 offsets overflow: over 2 GiB of ids
        return column.cast(pa.large_string()).combine_chunks()


def from_parquet(data: bytes, name: str) -> IdMap:
    """The id map in a parquet file's bytes (its ``doc_id`` column), in memory."""
    try:
        table = pq.read_table(io.BytesIO(data), columns=[COLUMN])
    except (pa.ArrowInvalid, KeyError) as err:
        raise InputError(f"{name}: not an id map with a {COLUMN!r} column ({err})") from err
    return IdMap(_one_chunk(table.column(COLUMN)), name)


def content_sha256(array: pa.Array) -> str:
    """sha256 of the array's type, length and buffers (what :func:`open_mapped` checks)."""
    digest = hashlib.sha256(f"{array.type}:{len(array)}:{array.offset}".encode())
    for buffer in array.buffers():
        if buffer is not None:
            digest.update(buffer)
    return digest.hexdigest()


def write_mapped(ids: IdMap, path: str, source_sha256: str) -> IdMap:
    """Write ``ids`` as an uncompressed Arrow IPC file; returns it opened with
    :func:`open_mapped` (which checks what was written)."""
    metadata = {"source_sha256": source_sha256, "content_sha256": content_sha256(ids.array)}
    schema = pa.schema([pa.field(COLUMN, ids.array.type, nullable=False)], metadata=metadata)
    with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([ids.array], schema=schema))
    mapped = open_mapped(path, source_sha256)
    if mapped is None:
        raise OSError(f"{path}: the id map copy just written does not read back as written")
    return mapped


def open_mapped(path: str, source_sha256: str, check_content: bool = True) -> IdMap | None:
    """The id map in the Arrow IPC file ``path``, memory-mapped (zero-copy); None when the
    file is unreadable, was made from another id map than ``source_sha256``, or (with
    ``check_content``, which reads it once) its bytes are not the ones written."""
    try:
        reader = ipc.open_file(pa.memory_map(path, "r"))
        metadata = reader.schema.metadata or {}
        if (reader.num_record_batches != 1
                or metadata.get(b"source_sha256") != source_sha256.encode()):
            return None
        array = reader.get_batch(0).column(0)
    except (pa.ArrowInvalid, OSError):
        return None
    if check_content and metadata.get(b"content_sha256") != content_sha256(array).encode():
        return None
    return IdMap(array, path)
