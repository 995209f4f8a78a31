"""Data formats: BEIR folders, MS MARCO / TREC files, and training examples.

Every loader reads from a local path or any fsspec URL, and every malformed input raises
:class:`DataFormatError` naming the file, the line and the problem.

BEIR folder::

    corpus.jsonl[.gz]        {"_id": str, "title": str (optional), "text": str}
    queries.jsonl[.gz]       {"_id": str, "text": str}; queries_<split>.jsonl[.gz] wins if present
    qrels/<split>.tsv        header "query-id<TAB>corpus-id<TAB>score", one judged pair a line

MS MARCO / TREC: a collection or queries TSV (``id<TAB>text``, or ``id<TAB>title<TAB>text`` for
a collection) and 4-column TREC qrels (``qid 0 docid rel``, whitespace separated).

Training examples (JSONL, one object a line, or parquet with the same columns)::

    {"query": str, "positives": [str, ...], "negatives": [str, ...],
     "query_id": str (optional), "positive_ids": [str] (optional), "negative_ids": [str] (optional)}

A passage string is ``title + " " + text`` when the source has a title.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from retriever.io import store
from retriever.errors import InputError


class DataFormatError(InputError):
    """Malformed input, located as precisely as the format allows.

    ``line`` counts lines (``unit="line"``) or parquet rows (``unit="row"``); ``kind`` is one
    of :data:`PROBLEMS` for a bad corpus row (the encode job counts skipped rows by it).
    Pickles with all its fields, so it crosses Ray task boundaries intact.
    """

    def __init__(self, source: str, problem: str, line: int | None = None, kind: str = "",
                 unit: str = "line"):
        self.source, self.problem, self.line, self.kind, self.unit = (source, problem, line,
                                                                      kind, unit)
        where = f"{source}, {unit} {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.source, self.problem, self.line, self.kind, self.unit))


PROBLEMS = ("bad_json", "not_object", "missing_id", "empty_id", "bad_type", "missing_text",
            "empty_text", "invalid_utf8", "duplicate_id")
ID_COLUMNS = ("_id", "doc_id", "id")


def passage_text(title: str, text: str) -> str:
    """What an encoder or BM25 sees of a document."""
    return f"{title} {text}" if title else text


@dataclass
class Corpus:
    """Documents in file order; ``passage(i)`` is the text an encoder or BM25 sees."""

    ids: list[str]
    titles: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def passage(self, i: int) -> str:
        return passage_text(self.titles[i], self.texts[i])

    def passages(self) -> list[str]:
        return [self.passage(i) for i in range(len(self.ids))]

    def subset(self, keep: Iterable[int]) -> "Corpus":
        keep = list(keep)
        return Corpus([self.ids[i] for i in keep], [self.titles[i] for i in keep],
                      [self.texts[i] for i in keep])


Qrels = dict[str, dict[str, int]]


@dataclass
class Dataset:
    """A retrieval test collection: corpus, queries (id -> text) and graded judgments."""

    name: str
    corpus: Corpus
    queries: dict[str, str]
    qrels: Qrels
    split: str = "test"
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def judged_queries(self) -> dict[str, str]:
        """The queries with at least one judgment, in query-file order."""
        return {qid: text for qid, text in self.queries.items() if qid in self.qrels}


# ---------------------------------------------------------------------------- line readers

def _find(base: str, *candidates: str) -> str | None:
    for name in candidates:
        url = store.join(base, name)
        if store.exists(url):
            return url
    return None


def numbered_lines(url: str, handle) -> Iterator[tuple[int, bytes]]:
    """(1-based number, raw line); a truncated or corrupt compressed file is a clear error."""
    number = 0
    lines = iter(handle)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, ValueError) as err:  # gzip/bz2/lzma/zstd decoding errors
            raise DataFormatError(url, f"cannot read past line {number} ({err})") from None
        number += 1
        yield number, raw


def raw_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes without the line end) for every non-blank line."""
    try:
        handle = store.open_read(url, "rb")
    except FileNotFoundError as err:
        raise DataFormatError(url, "file not found") from err
    empty = True
    with handle:
        for number, raw in numbered_lines(url, handle):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                empty = False
                yield number, raw
    if empty:
        raise DataFormatError(url, "file is empty")


class RangeLines:
    """The non-blank lines of an uncompressed text file that START in bytes ``[start, end)``.

    Iterating yields (1-based line number counted from the range start, raw bytes without the
    line end): a line's absolute number is its number here plus the newlines before ``start``.
    After iteration, ``newlines`` holds the ``\\n`` bytes inside ``[start, end)``, so the
    ranges of a file can be read in parallel and their offsets summed afterwards. A line
    that starts before ``start`` belongs to the previous range and is skipped; the last line
    may run past ``end``. ``end=None`` reads to the end of the file.
    """

    def __init__(self, url: str, start: int = 0, end: int | None = None):
        self.url, self.start, self.end, self.newlines = url, start, end, 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        end = float("inf") if self.end is None else self.end
        self.newlines = 0
        try:
            handle = store.open_read(self.url, "rb", compression=None)
        except FileNotFoundError as err:
            raise DataFormatError(self.url, "file not found") from err
        with handle:
            position = self.start
            if self.start > 0:
                handle.seek(self.start - 1)
                if handle.read(1) != b"\n":  # mid-line: that line is the previous range's
                    rest = handle.readline()
                    position += len(rest)
                    self.newlines += rest.endswith(b"\n") and position - 1 < end
            number = self.newlines + 1
            while position < end:
                raw = handle.readline()
                if not raw:
                    return
                position += len(raw)
                if raw.endswith(b"\n"):
                    self.newlines += position - 1 < end
                line = raw.rstrip(b"\r\n")
                if line.strip():
                    yield number, line
                number += 1


def decode_line(url: str, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(url, f"invalid UTF-8 ({err.reason})", number,
                              "invalid_utf8") from None


def _lines(url: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every non-blank line; invalid UTF-8 is an error."""
    for number, raw in raw_lines(url):
        yield number, decode_line(url, number, raw)


def parse_json_line(url: str, number: int, raw: bytes) -> dict:
    """One JSONL line as a JSON object."""
    try:
        obj = json.loads(decode_line(url, number, raw))
    except json.JSONDecodeError as err:
        raise DataFormatError(url, f"bad JSON ({err.msg} at column {err.colno})", number,
                              "bad_json") from None
    if not isinstance(obj, dict):
        raise DataFormatError(url, f"expected a JSON object, got {type(obj).__name__}", number,
                              "not_object")
    return obj


def read_jsonl(url: str) -> Iterator[tuple[int, dict]]:
    for number, raw in raw_lines(url):
        yield number, parse_json_line(url, number, raw)


def string_field(url: str, number: int, obj: dict, key: str, required: bool,
                 missing: str = "missing_text", unit: str = "line") -> str:
    """``obj[key]`` as a string ("" when absent and not required); numeric ids are allowed."""
    value = obj.get(key)
    if value is None:
        if required:
            raise DataFormatError(url, f"missing {key!r}", number, missing, unit)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ID_COLUMNS:
        return str(value)
    if not isinstance(value, str):
        raise DataFormatError(url, f"{key!r} must be a string, got {type(value).__name__}",
                              number, "bad_type", unit)
    return value


def parse_document(url: str, number: int, obj: dict, id_key: str = "_id",
                   unit: str = "line") -> tuple[str, str, str]:
    """(doc id, title, text) of one corpus row (a JSON object or a parquet row).

    The id is required and non-blank; ``text`` is required unless a title is given; title
    and text may not both be blank.
    """
    doc_id = string_field(url, number, obj, id_key, True, "missing_id", unit)
    title = string_field(url, number, obj, "title", False, "missing_text", unit)
    text = string_field(url, number, obj, "text", "text" in obj or not title, "missing_text",
                        unit)
    if not doc_id.strip():
        raise DataFormatError(url, f"empty {id_key!r}", number, "empty_id", unit)
    if not (title.strip() or text.strip()):
        raise DataFormatError(url, f"document {doc_id!r} has empty title and text", number,
                              "empty_text", unit)
    return doc_id, title, text


# ---------------------------------------------------------------------------- BEIR

def load_corpus(url: str) -> Corpus:
    """A BEIR ``corpus.jsonl[.gz]``; ids must be unique and documents non-empty."""
    ids, titles, texts, seen = [], [], [], {}
    for number, obj in read_jsonl(url):
        doc_id, title, text = parse_document(url, number, obj)
        if doc_id in seen:
            raise DataFormatError(url, f"duplicate _id {doc_id!r} (first on line {seen[doc_id]})",
                                  number, "duplicate_id")
        seen[doc_id] = number
        ids.append(doc_id)
        titles.append(title)
        texts.append(text)
    return Corpus(ids, titles, texts)


def load_queries(url: str) -> dict[str, str]:
    """A BEIR ``queries.jsonl[.gz]`` (id -> text), or a TSV ``id<TAB>text`` file."""
    if _is_tsv(url):
        return _load_id_text_tsv(url)
    queries: dict[str, str] = {}
    for number, obj in read_jsonl(url):
        qid = string_field(url, number, obj, "_id", True, "missing_id")
        text = string_field(url, number, obj, "text", True)
        if not text.strip():
            raise DataFormatError(url, f"query {qid!r} has empty text", number)
        if qid in queries:
            raise DataFormatError(url, f"duplicate _id {qid!r}", number)
        queries[qid] = text
    return queries


def load_qrels(url: str) -> Qrels:
    """BEIR qrels TSV (header ``query-id corpus-id score``) or 4-column TREC qrels."""
    qrels: Qrels = {}
    for number, line in _lines(url):
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue
        if len(parts) == 3:
            qid, did, score = parts
        elif len(parts) == 4:  # TREC: qid iteration docid rel
            qid, _, did, score = parts
        else:
            raise DataFormatError(url, f"expected 3 (BEIR) or 4 (TREC) columns, got {len(parts)}",
                                  number)
        try:
            grade = int(float(score))
        except ValueError as err:
            raise DataFormatError(url, f"relevance {score!r} is not a number", number) from err
        qrels.setdefault(qid.strip(), {})[did.strip()] = grade
    return qrels


def _is_tsv(url: str) -> bool:
    name = url.rsplit("/", 1)[-1]
    return any(name.endswith(ext) for ext in (".tsv", ".tsv.gz", ".txt", ".txt.gz"))


def _tsv_rows(url: str, expected: str,
              columns: Callable[[list[str]], tuple[str, str, str] | None]
              ) -> Iterator[tuple[str, str, str]]:
    """(id, title, text) of each line of an id-keyed TSV; ``columns`` maps a line's fields to
    them (None: wrong column count). Ids are unique and non-empty, documents non-empty."""
    seen: set[str] = set()
    for number, line in _lines(url):
        row = columns(line.split("\t"))
        if row is None or not row[0].strip():
            raise DataFormatError(url, f"expected {expected}", number)
        key, title, text = row[0].strip(), row[1], row[2]
        if not (title.strip() or text.strip()):
            raise DataFormatError(url, f"id {key!r} has empty text", number, "empty_text")
        if key in seen:
            raise DataFormatError(url, f"duplicate id {key!r}", number, "duplicate_id")
        seen.add(key)
        yield key, title, text


def _load_id_text_tsv(url: str) -> dict[str, str]:
    def columns(parts: list[str]) -> tuple[str, str, str] | None:
        return (parts[0], "", " ".join(p for p in parts[1:] if p)) if len(parts) >= 2 else None

    return {key: text for key, _, text in _tsv_rows(url, "'id<TAB>text'", columns)}


def load_collection_tsv(url: str) -> Corpus:
    """An MS MARCO collection TSV: ``pid<TAB>text`` or ``pid<TAB>title<TAB>text``."""
    def columns(parts: list[str]) -> tuple[str, str, str] | None:
        return {2: (parts[0], "", parts[-1]), 3: tuple(parts)}.get(len(parts))

    rows = list(_tsv_rows(url, "'pid<TAB>text' or 'pid<TAB>title<TAB>text'", columns))
    return Corpus([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def check_qrels(qrels: Qrels, queries: dict[str, str], corpus: Corpus, qrels_url: str) -> None:
    """Judgments must name known queries and documents."""
    doc_ids = set(corpus.ids)
    for qid, judged in qrels.items():
        if qid not in queries:
            raise DataFormatError(qrels_url, f"query id {qid!r} is not in the queries file")
        for did in judged:
            if did not in doc_ids:
                raise DataFormatError(qrels_url,
                                      f"doc id {did!r} (query {qid!r}) is not in the corpus")


def load_dataset(source: str, split: str = "test") -> Dataset:
    """A BEIR folder (local path or fsspec URL) or an MS MARCO/TREC folder.

    The BEIR layout is tried first; a folder holding ``collection.tsv``, ``queries.<split>.tsv``
    and ``qrels.<split>.tsv`` (TREC qrels) is read as MS MARCO.
    """
    base = source.rstrip("/")
    corpus_url = _find(base, "corpus.jsonl", "corpus.jsonl.gz")
    if corpus_url:
        queries_url = _find(base, f"queries_{split}.jsonl", f"queries_{split}.jsonl.gz",
                            "queries.jsonl", "queries.jsonl.gz")
        qrels_url = _find(base, f"qrels/{split}.tsv", f"qrels/{split}.tsv.gz")
        corpus = load_corpus(corpus_url)
    else:
        collection_url = _find(base, "collection.tsv", "collection.tsv.gz")
        if not collection_url:
            raise DataFormatError(base, "not a dataset folder: no corpus.jsonl[.gz] (BEIR) "
                                        "nor collection.tsv (MS MARCO)")
        queries_url = _find(base, f"queries.{split}.tsv", f"queries.{split}.tsv.gz")
        qrels_url = _find(base, f"qrels.{split}.tsv", f"qrels.{split}.txt",
                          f"qrels.{split}.tsv.gz")
        corpus_url = collection_url
        corpus = load_collection_tsv(collection_url)
    if not queries_url:
        raise DataFormatError(base, f"no queries file for split {split!r}")
    if not qrels_url:
        raise DataFormatError(base, f"no qrels for split {split!r}")
    queries = load_queries(queries_url)
    qrels = load_qrels(qrels_url)
    check_qrels(qrels, queries, corpus, qrels_url)
    name = base.rsplit("/", 1)[-1]
    return Dataset(name=name, corpus=corpus, queries=queries, qrels=qrels, split=split,
                   source=source, files={"corpus": corpus_url, "queries": queries_url,
                                         "qrels": qrels_url})


# ---------------------------------------------------------------------------- training examples

@dataclass
class TrainingExample:
    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    query_id: str = ""
    positive_ids: list[str] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"query_id": self.query_id, "query": self.query, "positives": self.positives,
                "negatives": self.negatives, "positive_ids": self.positive_ids,
                "negative_ids": self.negative_ids}


def _example(url: str, number: int, obj: dict) -> TrainingExample:
    query = obj.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataFormatError(url, "'query' must be a non-empty string", number)
    lists = {}
    for key in ("positives", "negatives", "positive_ids", "negative_ids"):
        value = obj.get(key) or []
        if hasattr(value, "tolist"):
            value = value.tolist()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataFormatError(url, f"{key!r} must be a list of strings", number)
        lists[key] = value
    if not lists["positives"]:
        raise DataFormatError(url, "'positives' must hold at least one passage", number)
    return TrainingExample(query=query, query_id=str(obj.get("query_id") or ""), **lists)


def load_training_examples(url: str) -> list[TrainingExample]:
    """Training examples from JSONL (one object a line) or parquet (same columns)."""
    if url.endswith(".parquet"):
        table = store.read_parquet(url)
        if "query" not in table.column_names or "positives" not in table.column_names:
            raise DataFormatError(url, "parquet needs columns 'query' and 'positives'")
        rows = table.to_pylist()
        if not rows:
            raise DataFormatError(url, "file is empty")
        return [_example(url, i + 1, row) for i, row in enumerate(rows)]
    return [_example(url, number, obj) for number, obj in read_jsonl(url)]


def write_training_examples(examples: list[TrainingExample], url: str) -> None:
    """Write examples as JSONL or parquet (by the URL's extension)."""
    rows = [ex.to_dict() for ex in examples]
    if url.endswith(".parquet"):
        import pyarrow as pa

        store.write_parquet(pa.Table.from_pylist(rows), url)
        return
    buffer = io.StringIO()
    for row in rows:
        buffer.write(json.dumps(row, ensure_ascii=False) + "\n")
    store.write_text(url, buffer.getvalue())


def write_qrels(qrels: Qrels, url: str) -> None:
    """BEIR qrels TSV with header."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["query-id", "corpus-id", "score"])
    for qid, judged in qrels.items():
        for did, grade in judged.items():
            writer.writerow([qid, did, grade])
    store.write_text(url, buffer.getvalue())
