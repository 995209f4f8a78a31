"""A corpus read as fixed shards by many read tasks at once: the source side of the encode job.

Input (local path or any fsspec URL): a BEIR folder (its ``corpus.jsonl[.gz]``), a JSONL file
(``{"_id", "title"?, "text"}`` a line, optionally compressed), a parquet file (an id column
``_id``/``doc_id``/``id``, ``text``, optional ``title``), or a folder of JSONL/parquet files
read in name order. A document's text is ``title + " " + text`` as in :class:`data.Corpus`.

**Pieces** (the unit of a read task). An uncompressed JSONL file is cut into byte ranges of
``read_bytes``; a range ``[a, b)`` owns the lines that START in it
(:class:`formats.RangeLines`). A compressed JSONL file is one piece (it cannot be entered
mid-stream); a parquet file gives one piece per row group. Pieces are ordered by file, then
position, and depend only on the files' sizes (or row groups) and ``read_bytes``.

**Shard plan.** Input rows (non-blank lines or parquet rows, good or bad) are numbered from 0
across the pieces in order; piece ``p`` with ``R`` rows holds ``ceil(R / D)`` shards of ``D =
docs_per_shard`` rows (its last one may be short), numbered on from the previous piece's: a
shard is a fixed slice of one file. Each shard carries ``input_sha256``, a hash of its raw
rows, so a re-run can tell a finished shard of the same input from a stale one.

**Passes** (:func:`plan_corpus`; on Ray each is a wave of small tasks spread over the nodes,
without Ray a loop): (1) *scan*: each piece counts its lines and rows, notes its first bad
row, and writes its good rows' ``(slot, id, line)`` to ``<scratch>/ids-PPPPPP.parquet`` (slot =
crc32(id) mod 4096); the driver sums the counts into each piece's line offset (absolute line
numbers) and first shard. (2) *duplicates*: ids are hash-partitioned into buckets of about
:data:`ROWS_PER_BUCKET` rows; one task per bucket reads its slots from every piece and finds
the ids seen twice, writing the later copies (file order, then line) to
``<scratch>/dups-BBBBB.parquet``. No process ever holds more than one piece's or one bucket's
ids. (3) *read* (:class:`CorpusDatasource`, one Ray Data read task per piece): the shards,
with the later copies dropped.

**Bad input** (``on_bad_input``): ``"error"`` (default) stops, before anything is encoded, at
the first bad row in file order with a :class:`DataFormatError` naming the file, the line
(JSONL) or row (parquet) and the problem; a duplicate id names both places. ``"skip"`` drops
the row and counts it by problem (``formats.PROBLEMS``) with a few examples; of a duplicated
id the first copy is kept. A missing, unreadable or empty file is always an error.

:func:`iter_shards` is the same plan without Ray (one process: for tools and tests).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasource
from ray.data.block import BlockMetadata
from ray.data.datasource import ReadTask

from retriever.io import store
from retriever.io.formats import (ID_COLUMNS, DataFormatError, RangeLines, numbered_lines,
                                  parse_document, parse_json_line, passage_text)

POLICIES = ("error", "skip")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst")
MAX_EXAMPLES = 5  # bad-row examples kept per shard
READ_BYTES = 64 * 2**20  # default byte range of one read task
ROWS_PER_BUCKET = 1 << 17  # ids one duplicate-finding task holds (about)
SLOTS = 4096  # id hash slots; a bucket is a run of slots
READ_CPUS = 0.1

SHARD_SCHEMA = pa.schema([
    ("shard", pa.int64()), ("first_row", pa.int64()), ("input_rows", pa.int64()),
    ("input_sha256", pa.string()), ("doc_ids", pa.list_(pa.string())),
    ("texts", pa.list_(pa.large_string())), ("skipped", pa.string()),
    ("done", pa.bool_()), ("last", pa.bool_()), ("read_node", pa.string()),
])
IDS_SCHEMA = pa.schema([("slot", pa.int32()), ("id", pa.string()), ("line", pa.int64())])
DUPS_SCHEMA = pa.schema([("piece", pa.int64()), ("line", pa.int64()), ("id", pa.string()),
                         ("first_file", pa.int64()), ("first_line", pa.int64())])


# ---------------------------------------------------------------------------- sources

def _is_jsonl(name: str) -> bool:
    return any(name.endswith(s + c) for s in JSONL_SUFFIXES for c in COMPRESSIONS)


def _is_parquet(name: str) -> bool:
    return name.endswith(".parquet")


def _is_compressed(name: str) -> bool:
    return any(name.endswith(c) for c in COMPRESSIONS if c)


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


# ---------------------------------------------------------------------------- pieces

@dataclass(frozen=True)
class Piece:
    """A fixed slice of one file: bytes ``[start, end)`` (JSONL; ``end=None``: to the end) or
    row group ``start`` (parquet)."""

    file: int  # index in the corpus's files
    url: str
    start: int
    end: int | None
    parquet: bool = False

    @property
    def unit(self) -> str:
        return "row" if self.parquet else "line"


def _open_parquet(url: str):
    import pyarrow.parquet as pq

    try:
        handle = store.open_read(url, "rb", compression=None)
    except FileNotFoundError as err:
        raise DataFormatError(url, "file not found") from err
    try:
        return handle, pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as err:
        handle.close()
        raise DataFormatError(url, f"not a readable parquet file ({err})") from None


def plan_pieces(files: list[str], read_bytes: int = READ_BYTES) -> list[Piece]:
    """Every piece of the corpus, in reading order (file metadata only: sizes, row groups)."""
    if read_bytes < 1:
        raise ValueError(f"read_bytes must be >= 1, got {read_bytes}")
    pieces: list[Piece] = []
    for i, url in enumerate(files):
        name = url.rsplit("/", 1)[-1]
        if _is_parquet(name):
            handle, reader = _open_parquet(url)
            with handle:
                groups = reader.metadata.num_row_groups
            pieces += [Piece(i, url, g, g + 1, True) for g in range(max(groups, 1))]
        elif _is_compressed(name):
            pieces.append(Piece(i, url, 0, None))
        else:
            fs, path = store.filesystem(url)
            try:
                size = fs.size(path)
            except FileNotFoundError as err:
                raise DataFormatError(url, "file not found") from err
            starts = range(0, max(size, 1), read_bytes)
            pieces += [Piece(i, url, a, None if a + read_bytes >= size else a + read_bytes)
                       for a in starts]
    return pieces


# ---------------------------------------------------------------------------- rows

@dataclass
class _Row:
    number: int  # 1-based line (JSONL) or row (parquet) within its file
    raw: bytes  # what the input hash covers
    doc: tuple[str, str] | None = None  # (doc id, passage) when good
    error: DataFormatError | None = None


def _document(url: str, number: int, obj: dict, id_key: str = "_id",
              unit: str = "line") -> tuple[str, str]:
    """(doc id, passage) of one row, checked as ``formats.load_corpus`` checks it."""
    doc_id, title, text = parse_document(url, number, obj, id_key, unit)
    return doc_id, passage_text(title, text)


class _PieceReader:
    """The rows of one piece, numbered ``offset + n`` (n counted from the piece's start);
    ``lines`` is, after iteration, what the next piece of the file is offset by."""

    def __init__(self, piece: Piece, offset: int = 0):
        self.piece, self.offset, self.lines = piece, offset, 0

    def __iter__(self) -> Iterator[_Row]:
        piece = self.piece
        if piece.parquet:
            yield from self._parquet_rows()
            return
        if _is_compressed(piece.url):
            lines = self._stream_lines()
        else:
            lines = RangeLines(piece.url, piece.start, piece.end)
        for number, raw in lines:
            row = _Row(self.offset + number, raw)
            try:
                row.doc = _document(piece.url, row.number,
                                    parse_json_line(piece.url, row.number, raw))
            except DataFormatError as err:
                row.error = err
            yield row
        if isinstance(lines, RangeLines):
            self.lines = lines.newlines

    def _stream_lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            handle = store.open_read(self.piece.url, "rb")
        except FileNotFoundError as err:
            raise DataFormatError(self.piece.url, "file not found") from err
        with handle:
            for number, raw in numbered_lines(self.piece.url, handle):
                self.lines = number
                raw = raw.rstrip(b"\r\n")
                if raw.strip():
                    yield number, raw

    def _parquet_rows(self, batch_rows: int = 4096) -> Iterator[_Row]:
        url = self.piece.url
        handle, reader = _open_parquet(url)
        with handle:
            names = reader.schema_arrow.names
            id_key = next((c for c in ID_COLUMNS if c in names), None)
            if id_key is None or "text" not in names:
                raise DataFormatError(url, f"parquet needs an id column ({'/'.join(ID_COLUMNS)}) "
                                       f"and 'text'; it has {', '.join(names)}")
            if reader.metadata.num_row_groups == 0:
                return
            columns = [id_key, "text"] + (["title"] if "title" in names else [])
            try:
                for batch in reader.iter_batches(batch_size=batch_rows, columns=columns,
                                                 row_groups=[self.piece.start]):
                    for obj in batch.to_pylist():
                        self.lines += 1
                        yield _parquet_row(url, self.offset + self.lines, obj, id_key)
            except pa.ArrowException as err:
                raise DataFormatError(url, f"cannot decode after row "
                                           f"{self.offset + self.lines} ({err})") from None


def _parquet_row(url: str, number: int, obj: dict, id_key: str) -> _Row:
    for key, value in list(obj.items()):
        if isinstance(value, bytes):  # a binary column: must decode as UTF-8
            try:
                obj[key] = value.decode("utf-8")
            except UnicodeDecodeError as err:
                obj[key] = err
    row = _Row(number, json.dumps(obj, sort_keys=True, default=repr).encode())
    bad = [k for k, v in obj.items() if isinstance(v, UnicodeDecodeError)]
    if bad:
        row.error = DataFormatError(url, f"{bad[0]!r}: invalid UTF-8", number, "invalid_utf8",
                                    "row")
        return row
    try:
        row.doc = _document(url, number, obj, id_key, unit="row")
    except DataFormatError as err:
        row.error = err
    return row


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


# ---------------------------------------------------------------------------- pass 1: scan

@dataclass
class PieceScan:
    """What the scan learnt of one piece (line numbers counted from the piece's start)."""

    lines: int = 0  # newlines (JSONL) or rows (parquet): the next piece's offset
    rows: int = 0  # input rows
    first_error: DataFormatError | None = None  # its first bad row
    fatal: DataFormatError | None = None  # unreadable: always an error
    ids: Any = None  # IDS_SCHEMA table of its good rows, or the URL it was written to
    node: str = ""


def _slot(doc_id: str) -> int:
    return zlib.crc32(doc_id.encode("utf-8")) % SLOTS


def scan_piece(piece: Piece, index: int, scratch: str | None) -> PieceScan:
    """Pass 1 for one piece: counts, first bad row, and the ids to look for duplicates."""
    scan, reader = PieceScan(node=_node_id()), _PieceReader(piece)
    ids, lines = [], []
    try:
        for row in reader:
            scan.rows += 1
            if row.error is not None:
                scan.first_error = scan.first_error or row.error
            else:
                ids.append(row.doc[0])
                lines.append(row.number)
    except DataFormatError as err:
        scan.fatal = err
        return scan
    scan.lines = reader.lines
    table = pa.table({"slot": pa.array([_slot(i) for i in ids], pa.int32()),
                      "id": pa.array(ids, pa.string()), "line": pa.array(lines, pa.int64())},
                     schema=IDS_SCHEMA)
    if scratch is None:
        scan.ids = table
    else:
        scan.ids = store.join(scratch, f"ids-{index:06d}.parquet")
        store.write_parquet(table, scan.ids)
    return scan


def _table(source: Any) -> pa.Table:
    return store.read_parquet(source) if isinstance(source, str) else source


# ---------------------------------------------------------------------------- layout

@dataclass
class PieceLayout:
    """Where a piece sits in the plan, from the scan's counts."""

    line_offset: int  # lines (rows) of its file before it
    first_row: int  # global index of its first input row
    rows: int
    first_shard: int
    shards: int


def layout(pieces: list[Piece], scans: list[PieceScan], docs_per_shard: int) -> list[PieceLayout]:
    out, offsets, row, shard = [], {}, 0, 0
    for piece, scan in zip(pieces, scans):
        offset = offsets.get(piece.file, 0)
        shards = math.ceil(scan.rows / docs_per_shard)
        out.append(PieceLayout(offset, row, scan.rows, shard, shards))
        offsets[piece.file] = offset + scan.lines
        row, shard = row + scan.rows, shard + shards
    return out


def _relocated(err: DataFormatError, offset: int) -> DataFormatError:
    line = None if err.line is None else err.line + offset
    return DataFormatError(err.source, err.problem, line, err.kind, err.unit)


def _input_errors(pieces, scans, layouts) -> tuple[list, list]:
    """((piece, line), error) of unreadable or empty files, and of each piece's first bad
    row (absolute line)."""
    files, rows = [], []
    rows_of_file, first_piece, unreadable = {}, {}, set()
    for i, (piece, scan) in enumerate(zip(pieces, scans)):
        rows_of_file[piece.file] = rows_of_file.get(piece.file, 0) + scan.rows
        first_piece.setdefault(piece.file, i)
        if scan.fatal is not None:
            files.append(((i, -1), scan.fatal))
            unreadable.add(piece.file)
        elif scan.first_error is not None:
            err = _relocated(scan.first_error, layouts[i].line_offset)
            rows.append(((i, err.line or 0), err))
    for file, count in rows_of_file.items():
        if count == 0 and file not in unreadable:
            url = pieces[first_piece[file]].url
            files.append(((first_piece[file], -1), DataFormatError(url, "file is empty")))
    return files, rows


# ---------------------------------------------------------------------------- pass 2: dups

@dataclass
class BucketResult:
    """The later copies of duplicated ids in one bucket."""

    count: int = 0
    first: tuple | None = None  # (piece, line, id, first file, first line): earliest copy
    pieces: list[int] = field(default_factory=list)  # pieces holding later copies
    dups: Any = None  # DUPS_SCHEMA table, or the URL it was written to
    node: str = ""


def find_duplicates(bucket: int, buckets: int, sources: list[Any],
                    places: list[tuple[int, int]], scratch: str | None) -> BucketResult:
    """Pass 2 for one bucket (slots ``[bucket*SLOTS/buckets, (bucket+1)*SLOTS/buckets)``).

    ``sources[p]``: piece p's ids (table or URL); ``places[p]``: its (file, line offset).
    """
    import pyarrow.compute as pc

    low, high = bucket * SLOTS // buckets, (bucket + 1) * SLOTS // buckets
    parts = []
    for p, source in enumerate(sources):
        table = _table(source)
        table = table.filter(pc.and_(pc.greater_equal(table["slot"], low),
                                     pc.less(table["slot"], high)))
        parts.append(table.append_column("piece", pa.array(np.full(len(table), p, np.int64))))
    table = pa.concat_tables(parts).sort_by([("id", "ascending"), ("piece", "ascending"),
                                             ("line", "ascending")])
    result = BucketResult(node=_node_id())
    n = len(table)
    ids = table["id"]
    later = np.zeros(n, bool)
    if n > 1:
        later[1:] = pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    heads = np.maximum.accumulate(np.where(later, 0, np.arange(n)))  # each row's first copy
    pieces, lines = table["piece"].to_numpy(), table["line"].to_numpy()
    keep = np.flatnonzero(later)
    first_pieces = pieces[heads[keep]]
    first_files = np.array([places[p][0] for p in first_pieces], np.int64)
    first_lines = lines[heads[keep]] + np.array([places[p][1] for p in first_pieces], np.int64)
    dups = pa.table({"piece": pieces[keep], "line": lines[keep], "id": ids.take(keep),
                     "first_file": first_files, "first_line": first_lines}, schema=DUPS_SCHEMA)
    result.count, result.pieces = len(keep), sorted(set(pieces[keep].tolist()))
    if len(keep):
        k = int(np.lexsort((lines[keep], pieces[keep]))[0])
        result.first = (int(pieces[keep][k]), int(lines[keep][k]), ids[int(keep[k])].as_py(),
                        int(first_files[k]), int(first_lines[k]))
    if scratch is None or not len(keep):
        result.dups = dups
    else:
        result.dups = store.join(scratch, f"dups-{bucket:05d}.parquet")
        store.write_parquet(dups, result.dups)
    return result


def _duplicate_error(files: list[str], here: Piece, line: int, doc_id: str, first_file: int,
                     first_line: int) -> DataFormatError:
    """``<file>, line N: duplicate id 'x' (first at [<file>, ]line M)`` (absolute lines)."""
    there = files[first_file]
    unit = "row" if _is_parquet(there) else "line"
    first_at = (f"{there}, " if there != here.url else "") + f"{unit} {first_line}"
    return DataFormatError(here.url, f"duplicate id {doc_id!r} (first at {first_at})", line,
                           "duplicate_id", here.unit)


# ---------------------------------------------------------------------------- the plan

Mapper = Callable[[Callable, list[tuple]], list]


def local_map(fn: Callable, calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


@dataclass
class CorpusPlan:
    """The scanned corpus: pieces, where they sit, and where their later copies are listed."""

    files: list[str]
    pieces: list[Piece]
    layouts: list[PieceLayout]
    docs_per_shard: int
    on_bad_input: str
    duplicates: dict[int, list[Any]]  # piece -> dups tables / URLs naming its later copies
    duplicate_count: int = 0
    nodes: list[str] = field(default_factory=list)  # where the scan ran

    @property
    def shards(self) -> int:
        return sum(lay.shards for lay in self.layouts)

    @property
    def input_rows(self) -> int:
        return sum(lay.rows for lay in self.layouts)

    def jobs(self, done: dict[int, str] | None = None,
             wanted: set[int] | None = None) -> Iterator["PieceJob"]:
        """One read job per piece that has a shard to yield (``wanted``: None = all)."""
        done, last = done or {}, self.shards - 1
        for i, (piece, lay) in enumerate(zip(self.pieces, self.layouts)):
            mine = range(lay.first_shard, lay.first_shard + lay.shards)
            picked = [k for k in mine if wanted is None or k in wanted]
            if picked:
                yield PieceJob(i, piece, lay, self.files, self.docs_per_shard, self.on_bad_input,
                               {k: done[k] for k in picked if k in done}, picked, last,
                               self.duplicates.get(i, []))


def plan_corpus(files: list[str], docs_per_shard: int, on_bad_input: str = "error",
                read_bytes: int = READ_BYTES, scratch: str | None = None,
                mapper: Mapper = local_map) -> CorpusPlan:
    """Passes 1 and 2; under ``error`` raises the first bad row or duplicate in file order.

    ``scratch``: a folder every task can reach for the id lists (None: kept in memory);
    ``mapper(fn, calls)``: runs ``fn(*args)`` for each call (a loop, or Ray tasks)."""
    if on_bad_input not in POLICIES:
        raise ValueError(f"on_bad_input {on_bad_input!r}: expected one of {', '.join(POLICIES)}")
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    if not files:
        raise DataFormatError("corpus", "no documents")
    pieces = plan_pieces(files, read_bytes)
    scans = mapper(scan_piece, [(p, i, scratch) for i, p in enumerate(pieces)])
    layouts = layout(pieces, scans, docs_per_shard)
    unreadable, bad_rows = _input_errors(pieces, scans, layouts)
    if unreadable:  # unreadable or empty files: always an error
        raise min(unreadable, key=lambda e: e[0])[1]
    total = sum(lay.rows for lay in layouts)
    buckets = max(1, min(SLOTS, math.ceil(total / ROWS_PER_BUCKET)))
    places = [(p.file, lay.line_offset) for p, lay in zip(pieces, layouts)]
    sources = [s.ids for s in scans]
    results = mapper(find_duplicates, [(b, buckets, sources, places, scratch)
                                       for b in range(buckets)])
    firsts = [r.first for r in results if r.first is not None]
    if on_bad_input == "error" and (bad_rows or firsts):
        candidates = list(bad_rows)
        if firsts:
            piece, line, doc_id, first_file, first_line = min(firsts, key=lambda f: f[:2])
            line += layouts[piece].line_offset
            candidates.append(((piece, line), _duplicate_error(
                files, pieces[piece], line, doc_id, first_file, first_line)))
        raise min(candidates, key=lambda e: e[0])[1]
    duplicates: dict[int, list[Any]] = {}
    for r in results:
        for p in r.pieces:
            duplicates.setdefault(p, []).append(r.dups)
    nodes = sorted({s.node for s in scans} | {r.node for r in results})
    return CorpusPlan(list(files), pieces, layouts, docs_per_shard, on_bad_input, duplicates,
                      sum(r.count for r in results), nodes)


# ---------------------------------------------------------------------------- pass 3: read

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
    read_node: str = ""

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
                "done": self.done, "last": self.last, "read_node": self.read_node}


@dataclass
class PieceJob:
    """What one read task needs: its piece, where it sits, and which shards to yield."""

    index: int
    piece: Piece
    layout: PieceLayout
    files: list[str]
    docs_per_shard: int
    on_bad_input: str
    done: dict[int, str]  # shard -> input sha256 of a finished shard
    shards: list[int]  # the shards to yield
    last_shard: int
    duplicates: list[Any]  # dups tables / URLs listing this piece's later copies


def _later_copies(job: PieceJob) -> dict[int, DataFormatError]:
    """Line (absolute) -> the duplicate-id error of each later copy in this piece."""
    import pyarrow.compute as pc

    out = {}
    for source in job.duplicates:
        table = _table(source)
        for row in table.filter(pc.equal(table["piece"], job.index)).to_pylist():
            line = row["line"] + job.layout.line_offset
            out[line] = _duplicate_error(job.files, job.piece, line, row["id"],
                                         row["first_file"], row["first_line"])
    return out


def read_piece(job: PieceJob) -> Iterator[CorpusShard]:
    """Pass 3 for one piece: its wanted shards in order, later copies of ids dropped."""
    lay, size = job.layout, job.docs_per_shard
    later, wanted, node = _later_copies(job), set(job.shards), _node_id()
    rows_needed = (max(wanted) - lay.first_shard + 1) * size
    shard: CorpusShard | None = None
    for n, row in enumerate(_PieceReader(job.piece, lay.line_offset)):
        index = lay.first_shard + n // size
        if n % size == 0:
            if shard is not None and shard.index in wanted:
                yield _finish(shard, job)
            shard = CorpusShard(index, lay.first_row + n, read_node=node,
                                last=index == job.last_shard)
        if index not in wanted:
            continue
        _add_row(shard, row, later.get(row.number), job.on_bad_input)
        if n + 1 >= rows_needed:
            break  # nothing more to yield from this piece
    if shard is not None and shard.index in wanted:
        yield _finish(shard, job)


def _finish(shard: CorpusShard, job: PieceJob) -> CorpusShard:
    shard.done = job.done.get(shard.index) == shard.input_sha256
    return shard


def _add_row(shard: CorpusShard, row: _Row, duplicate: DataFormatError | None,
             on_bad_input: str) -> None:
    shard.input_rows += 1
    shard.digest.update(len(row.raw).to_bytes(8, "little"))
    shard.digest.update(row.raw)
    error = row.error or duplicate
    if error is None:
        shard.doc_ids.append(row.doc[0])
        shard.texts.append(row.doc[1])
        return
    if on_bad_input == "error":  # the plan found none: the input changed since
        raise error
    shard.skipped[error.kind] = shard.skipped.get(error.kind, 0) + 1
    if len(shard.examples) < MAX_EXAMPLES:
        shard.examples.append(str(error))


def iter_shards(files: list[str], docs_per_shard: int, on_bad_input: str = "error",
                done: dict[int, str] | None = None, max_shards: int | None = None,
                read_bytes: int = READ_BYTES) -> Iterator[CorpusShard]:
    """Every shard of the plan in order, in this process (no Ray).

    ``done`` maps shard index -> input sha256 of shards finished earlier: such a shard is
    yielded with ``done=True`` when its input is unchanged. ``max_shards`` stops the stream
    after that many shards still to encode.
    """
    plan = plan_corpus(files, docs_per_shard, on_bad_input, read_bytes)
    pending = 0
    for job in plan.jobs(done):
        for shard in read_piece(job):
            pending += not shard.done
            yield shard
            if max_shards and pending >= max_shards:
                return


# ---------------------------------------------------------------------------- Ray

def ray_map(fn: Callable, calls: list[tuple], window: int = 0) -> list:
    """``fn(*args)`` for each call as Ray tasks spread over the nodes, at most ``window``
    (default: twice the cluster's CPUs) in flight; results in call order."""
    import ray

    remote = ray.remote(fn).options(num_cpus=READ_CPUS, scheduling_strategy="SPREAD",
                                    max_retries=5)
    window = window or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
    results: dict[Any, int] = {}
    out: list = [None] * len(calls)
    queue = list(enumerate(calls))[::-1]
    while queue or results:
        while queue and len(results) < window:
            i, args = queue.pop()
            results[remote.remote(*args)] = i
        ready, _ = ray.wait(list(results), num_returns=1)
        for ref in ready:
            out[results.pop(ref)] = ray.get(ref)
    return out


class CorpusDatasource(Datasource):
    """A Ray Data datasource: one read task per piece job, one row (block) per shard."""

    def __init__(self, jobs: list[PieceJob]):
        super().__init__()
        self.jobs = jobs

    def get_name(self) -> str:
        return "ReadCorpusShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        # Each task carries its own job only (a closure over ``self`` would ship every job).
        return [ReadTask(functools.partial(_read_blocks, job),
                         BlockMetadata(num_rows=len(job.shards), size_bytes=None,
                                       exec_stats=None, input_files=[job.piece.url]),
                         schema=SHARD_SCHEMA)
                for job in self.jobs]


def _read_blocks(job: PieceJob) -> Iterator[pa.Table]:
    for shard in read_piece(job):
        yield pa.Table.from_pylist([shard.record()], schema=SHARD_SCHEMA)


def select_shards(plan: CorpusPlan, done: dict[int, str], max_shards: int | None) -> set[int]:
    """The shards a run reads: all, or those recorded as finished plus the first
    ``max_shards`` with no record (a recorded shard whose input changed is encoded too)."""
    if not max_shards:
        return set(range(plan.shards))
    pending = [k for k in range(plan.shards) if k not in done]
    return set(done) & set(range(plan.shards)) | set(pending[:max_shards])


def read_corpus(plan: CorpusPlan, done: dict[int, str] | None = None,
                max_shards: int | None = None, num_cpus: float = READ_CPUS):
    """A Ray Dataset of shards (rows of :data:`SHARD_SCHEMA`), read by one task per piece."""
    import ray.data

    done = done or {}
    jobs = list(plan.jobs(done, select_shards(plan, done, max_shards)))
    return ray.data.read_datasource(CorpusDatasource(jobs), num_cpus=num_cpus,
                                    override_num_blocks=max(1, len(jobs)))
