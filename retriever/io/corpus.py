"""A corpus read as a stream of fixed-size shards: the source side of the encode job.

Input (local path or any fsspec URL): a BEIR folder (its ``corpus.jsonl[.gz]``), a JSONL file
(``{"_id", "title"?, "text"}`` a line, optionally compressed), a parquet file (an id column
``_id``/``doc_id``/``id``, ``text``, optional ``title``), or a folder of JSONL/parquet files
read in name order. A document's text is ``title + " " + text`` as in :class:`data.Corpus`.

**Shard plan.** Input rows (non-blank lines or parquet rows, good or bad) are numbered from 0
across the files in order; shard ``k`` holds rows ``[k*D, (k+1)*D)`` for ``D =
docs_per_shard``. The plan depends only on the corpus and ``D``, so shard ``k`` always holds
the same documents. Each shard carries ``input_sha256``, a hash of its raw rows, so a re-run
can tell a finished shard of the same input from a stale one.

**Bad input** (``on_bad_input``): ``"error"`` (default) stops at the first bad row with a
:class:`DataFormatError` naming the file, the line (JSONL) or row (parquet) and the problem;
``"skip"`` drops the row and counts it by problem (``formats.PROBLEMS``) with a few examples.
A duplicate id keeps its first occurrence. A missing or empty file is always an error.

:class:`CorpusDatasource` streams the shards into Ray Data (one row per shard, so later
stages can never split a shard); :func:`iter_shards` is the same stream without Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import ray.data
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from retriever.io import store
from retriever.io.formats import (ID_COLUMNS, DataFormatError, parse_document,
                                  parse_json_line, passage_text, raw_lines)

POLICIES = ("error", "skip")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")
MAX_EXAMPLES = 5  # bad-row examples kept per shard

SHARD_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("first_row", pa.int64()), ("input_rows", pa.int64()),
    ("input_sha256", pa.string()), ("doc_ids", pa.list_(pa.string())),
    ("texts", pa.list_(pa.large_string())), ("skipped", pa.string()),
    ("done", pa.bool_()), ("last", pa.bool_()),
])


# ---------------------------------------------------------------------------- sources

def _is_jsonl(name: str) -> bool:
    return any(name.endswith(s + c) for s in JSONL_SUFFIXES for c in COMPRESSIONS)


def _is_parquet(name: str) -> bool:
    return name.endswith(".parquet")


@dataclass
class CorpusSource:
    """The files of a corpus, in reading order, and its name (for default output paths)."""

    url: str
    files: list[str]
    name: str

    @classmethod
    def open(cls, url: str) -> "CorpusSource":
        url = url if store.has_scheme(url) else store.join(os.path.abspath(url))
        fs, path = store.filesystem(url)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            raise DataFormatError(url, "not found")
        if fs.isdir(path):
            names = store.listdir(url)
            for beir in ("corpus.jsonl", "corpus.jsonl.gz"):
                if beir in names:
                    return cls(url, [store.join(url, beir)], _basename(url))
            files = [store.join(url, n) for n in names if _is_jsonl(n) or _is_parquet(n)]
            if not files:
                raise DataFormatError(url, "no corpus here: expected corpus.jsonl[.gz] (BEIR), "
                                       "or .jsonl[.gz] / .parquet files")
            return cls(url, files, _basename(url))
        name = _basename(url)
        if not (_is_jsonl(name) or _is_parquet(name)):
            raise DataFormatError(url, "unknown corpus format: expected .jsonl[.gz] or .parquet")
        if name.startswith("corpus."):  # BEIR file: name the corpus after its folder
            stem = _basename(url.rsplit("/", 1)[0])
        else:
            stem = name.split(".", 1)[0]
        return cls(url, [url], stem or "corpus")


def _basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/")) or "corpus"


# ---------------------------------------------------------------------------- rows

@dataclass
class _Row:
    number: int  # 1-based line (JSONL) or row (parquet) within its file
    raw: bytes  # what the input hash covers
    doc: tuple[str, str] | None = None  # (doc id, passage) when good
    error: DataFormatError | None = None


def _jsonl_rows(url: str) -> Iterator[_Row]:
    for number, raw in raw_lines(url):
        row = _Row(number, raw)
        try:
            row.doc = _document(url, number, parse_json_line(url, number, raw))
        except DataFormatError as err:
            row.error = err
        yield row


def _document(url: str, number: int, obj: dict, id_key: str = "_id",
              unit: str = "line") -> tuple[str, str]:
    """(doc id, passage) of one row, checked as ``formats.load_corpus`` checks it."""
    doc_id, title, text = parse_document(url, number, obj, id_key, unit)
    return doc_id, passage_text(title, text)


def _parquet_rows(url: str, batch_rows: int = 4096) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        handle = store.open_read(url, "rb", compression=None)
    except FileNotFoundError as err:
        raise DataFormatError(url, "file not found") from err
    with handle:
        try:
            reader = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise DataFormatError(url, f"not a readable parquet file ({err})") from None
        names = reader.schema_arrow.names
        id_key = next((c for c in ID_COLUMNS if c in names), None)
        if id_key is None or "text" not in names:
            raise DataFormatError(url, f"parquet needs an id column ({'/'.join(ID_COLUMNS)}) and "
                                   f"'text'; it has {', '.join(names)}")
        columns = [id_key, "text"] + (["title"] if "title" in names else [])
        number = 0
        try:
            batches = reader.iter_batches(batch_size=batch_rows, columns=columns)
            for batch in batches:
                for obj in batch.to_pylist():
                    number += 1
                    for key, value in list(obj.items()):
                        if isinstance(value, bytes):  # a binary column: must decode as UTF-8
                            try:
                                obj[key] = value.decode("utf-8")
                            except UnicodeDecodeError as err:
                                obj[key] = err
                    raw = json.dumps(obj, sort_keys=True, default=repr).encode()
                    row = _Row(number, raw)
                    bad = [k for k, v in obj.items() if isinstance(v, UnicodeDecodeError)]
                    if bad:
                        row.error = DataFormatError(url, f"{bad[0]!r}: invalid UTF-8", number,
                                                    "invalid_utf8", "row")
                    else:
                        try:
                            row.doc = _document(url, number, obj, id_key, unit="row")
                        except DataFormatError as err:
                            row.error = err
                    yield row
        except pa.ArrowException as err:
            raise DataFormatError(url, f"cannot decode after row {number} ({err})") from None
    if number == 0:
        raise DataFormatError(url, "file is empty")


def iter_rows(files: list[str]) -> Iterator[tuple[str, _Row]]:
    for url in files:
        rows = _parquet_rows(url) if _is_parquet(url.rsplit("/", 1)[-1]) else _jsonl_rows(url)
        for row in rows:
            yield url, row


# ---------------------------------------------------------------------------- shards

@dataclass
class CorpusShard:
    """One shard of the plan: its documents, its input hash and what was skipped."""

    index: int
    first_row: int
    input_rows: int = 0
    doc_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    done: bool = False
    last: bool = False

    @property
    def input_sha256(self) -> str:
        return self.digest.hexdigest()

    def record(self) -> dict:
        """The shard as one row of :data:`SHARD_SCHEMA` (a finished shard carries no text)."""
        return {"shard": self.index, "first_row": self.first_row,
                "input_rows": self.input_rows, "input_sha256": self.input_sha256,
                "doc_ids": [] if self.done else self.doc_ids,
                "texts": [] if self.done else self.texts,
                "skipped": json.dumps({"counts": self.skipped, "examples": self.examples},
                                      sort_keys=True),
                "done": self.done, "last": self.last}


def _unit(url: str) -> str:
    return "row" if _is_parquet(url) else "line"


def _plan(files: list[str], docs_per_shard: int, on_bad_input: str) -> Iterator[CorpusShard]:
    """Every shard of the corpus in order (the last one has ``last=True``)."""
    if on_bad_input not in POLICIES:
        raise ValueError(f"on_bad_input {on_bad_input!r}: expected one of {', '.join(POLICIES)}")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    seen: dict[str, int] = {}  # doc id -> (file index << 40) | line, where it first appeared
    file_index = {url: i for i, url in enumerate(files)}
    shard: CorpusShard | None = None
    row_index = 0
    for url, row in iter_rows(files):
        if shard is None or shard.input_rows == docs_per_shard:
            if shard is not None:
                yield shard
            shard = CorpusShard(index=row_index // docs_per_shard, first_row=row_index)
        row_index += 1
        shard.input_rows += 1
        shard.digest.update(len(row.raw).to_bytes(8, "little"))
        shard.digest.update(row.raw)
        error = row.error
        if error is None:
            doc_id, text = row.doc
            first = seen.get(doc_id)
            if first is not None:
                first_url = files[first >> 40]
                first_at = (f"{first_url}, " if first_url != url else "") + \
                    f"{_unit(first_url)} {first & ((1 << 40) - 1)}"
                error = DataFormatError(url, f"duplicate id {doc_id!r} (first at {first_at})",
                                        row.number, "duplicate_id", _unit(url))
            else:
                seen[doc_id] = (file_index[url] << 40) | row.number
                shard.doc_ids.append(doc_id)
                shard.texts.append(text)
                continue
        if on_bad_input == "error":
            raise error
        shard.skipped[error.kind] = shard.skipped.get(error.kind, 0) + 1
        if len(shard.examples) < MAX_EXAMPLES:
            shard.examples.append(str(error))
    if shard is None:
        raise DataFormatError(files[0] if files else "corpus", "no documents")
    shard.last = True
    yield shard


def iter_shards(files: list[str], docs_per_shard: int, on_bad_input: str = "error",
                done: dict[int, str] | None = None,
                max_shards: int | None = None) -> Iterator[CorpusShard]:
    """The shard stream the pipeline sees.

    ``done`` maps shard index -> input sha256 of shards finished earlier: such a shard is
    yielded with ``done=True`` and no text when its input is unchanged. ``max_shards`` stops
    the stream after that many shards still to encode (the run is then incomplete).
    """
    done = done or {}
    pending = 0
    for shard in _plan(files, docs_per_shard, on_bad_input):
        shard.done = done.get(shard.index) == shard.input_sha256
        pending += not shard.done
        yield shard
        if max_shards and pending >= max_shards:
            return


# ---------------------------------------------------------------------------- Ray Data

class CorpusDatasource(Datasource):
    """A Ray Data datasource streaming :func:`iter_shards`: one row (block) per shard.

    One read task reads the files in order (ids must be unique across the whole corpus and
    row numbers are global); reading is cheap next to encoding, which fans out downstream.
    """

    def __init__(self, files: list[str], docs_per_shard: int, on_bad_input: str = "error",
                 done: dict[int, str] | None = None, max_shards: int | None = None):
        super().__init__()
        self.files, self.docs_per_shard = list(files), docs_per_shard
        self.on_bad_input, self.done, self.max_shards = on_bad_input, done or {}, max_shards

    def get_name(self) -> str:
        return "ReadCorpusShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                             input_files=self.files)
        return [ReadTask(self._read, meta, schema=SHARD_SCHEMA)]

    def _read(self) -> Iterator[pa.Table]:
        for shard in iter_shards(self.files, self.docs_per_shard, self.on_bad_input, self.done,
                                 self.max_shards):
            yield pa.Table.from_pylist([shard.record()], schema=SHARD_SCHEMA)


def read_corpus(source: CorpusSource, docs_per_shard: int, on_bad_input: str = "error",
                done: dict[int, str] | None = None, max_shards: int | None = None,
                num_cpus: float = 0.1):
    """A Ray Dataset of shards (rows of :data:`SHARD_SCHEMA`), streamed by one read task."""
    datasource = CorpusDatasource(source.files, docs_per_shard, on_bad_input, done, max_shards)
    return ray.data.read_datasource(datasource, num_cpus=num_cpus, override_num_blocks=1)
