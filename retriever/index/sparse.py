"""BM25 shards beside a dense index: the same documents, the same shard plan, corpus-wide
statistics.

In: a finished dense index folder (``retriever.index.shards``) and the corpus its embeddings
were encoded from (by default the one the embeddings manifest records: its files, the encode
job's ``docs_per_shard`` and ``on_bad_input``, so the document stream is the encode job's own).
Out: one file per dense shard under the same folder, and the key ``sparse`` in the index's
``manifest.json``::

    shard-00000.bm25.npz   numpy arrays, no pickle: ``data`` (float32), ``indices`` (int32),
                           ``indptr`` (int64): bm25s' CSC score matrix, documents x terms;
                           ``terms`` and ``doc_ids``: UTF-8 bytes (uint8) with int64 offsets

Sparse shard ``s`` holds exactly dense shard ``s``'s documents in the same order (checked
against its id map while building). BM25 statistics (N, document frequencies, average document
length) are corpus-wide, counted in one pass over the corpus before any shard is scored (only
the term -> document frequency table is held), so each stored score is the one a single
:class:`~retriever.index.bm25.BM25Index` over all documents gives, and the merge of the shards'
top-k lists (``ranking.merge``) equals its top-k. Tokenisation and scoring are the project's
one BM25 set-up (``retriever.index.bm25``: bm25s, Lucene scoring, k1=0.9, b=0.4, English
stopwords, Snowball stemmer); the per-document scores are computed by bm25s' own scorer.

Manifest key ``sparse``: ``format`` ("retriever.sparse/1"), ``bm25`` (the BM25Config),
``stats`` ({"docs", "avg_len", "terms"}), ``corpus`` (files, docs_per_shard, on_bad_input,
fingerprint), ``identity`` (what a rebuild must match for the shards to be reused: the
corpus' fingerprint, the dense shards' id maps, the BM25 settings) and ``shards`` (list of
{"file", "rows", "start", "sha256"}). Loading checks each file against its sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np

from retriever.errors import InputError
from retriever.index import shards as dense
from retriever.index.bm25 import BM25Config, BM25Index, tokenize
from retriever.index.ranking import Hit
from retriever.io import store

FORMAT = "retriever.sparse/1"
KEY = "sparse"  # the index manifest's key for the sparse shards (absent: none)
ARRAYS = ("data", "indices", "indptr", "terms", "terms_offsets", "doc_ids", "doc_ids_offsets")
# bm25s methods whose scores need a per-query non-occurrence term: not stored in the shards.
UNSUPPORTED_METHODS = ("bm25l", "bm25+")


def file_name(number: int) -> str:
    return f"shard-{number:05d}.bm25.npz"


def has_sparse(manifest: dict) -> bool:
    """Whether the index whose manifest this is has BM25 shards."""
    return bool(manifest.get(KEY))


# --------------------------------------------------------------------------- the corpus

@dataclass
class CorpusSpec:
    """The corpus stream the dense index's embeddings were encoded from."""

    files: list[str]
    docs_per_shard: int = 1000
    on_bad_input: str = "error"
    fingerprint: str | None = None  # the encode job's: sha256 over its shards' input hashes
    read_bytes: int | None = None  # the encode job's read ranges (they cut its shard plan)

    @classmethod
    def of_embeddings(cls, embeddings_url: str, corpus: str | None = None) -> "CorpusSpec":
        """The embeddings manifest's source, or the corpus at ``corpus`` when given."""
        from retriever.io import embeddings
        from retriever.io.corpus import CorpusSource

        manifest = embeddings.read_manifest(embeddings_url)
        encode = manifest.get("encode", {})
        options = {"docs_per_shard": int(encode.get("docs_per_shard", 1000)),
                   "on_bad_input": encode.get("on_bad_input", "error"),
                   "read_bytes": (encode.get("read") or {}).get("read_bytes")}
        if corpus:
            return cls(CorpusSource.open(corpus).files, **options)
        files = manifest.get("source", {}).get("files")
        if not files:
            raise InputError(f"{embeddings_url}: its manifest names no corpus files (not "
                             "written by the encode job); give the corpus (--corpus URL)")
        return cls(list(files), fingerprint=manifest["source"].get("fingerprint"), **options)

    def content(self) -> str:
        """What the corpus holds: the recorded fingerprint, else its files' sha256."""
        if self.fingerprint:
            return self.fingerprint
        digest = hashlib.sha256()
        for url in self.files:
            with store.open_read(url, compression=None) as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()

    def batches(self) -> Iterator[tuple[list[str], list[str], str]]:
        """(doc ids, passages, input sha256) per encode shard, in the encode job's order."""
        from retriever.io.corpus import iter_shards

        recorded = {"read_bytes": self.read_bytes} if self.read_bytes else {}
        for shard in iter_shards(self.files, self.docs_per_shard, self.on_bad_input,
                                 **recorded):
            yield shard.doc_ids, shard.texts, shard.input_sha256


# --------------------------------------------------------------------------- statistics

@dataclass
class CorpusStats:
    """BM25's corpus-wide statistics: N, total length, term -> document frequency."""

    docs: int
    total_len: int
    df: Counter

    @property
    def avg_len(self) -> float:
        # = numpy's mean of the integer lengths (as bm25s computes it): the sum is exact
        return self.total_len / self.docs

    @classmethod
    def count(cls, corpus: CorpusSpec, config: BM25Config) -> "CorpusStats":
        """One pass over the corpus; refuses a corpus changed since it was encoded."""
        stats, hashes = cls(0, 0, Counter()), []
        for _, passages, input_sha256 in corpus.batches():
            hashes.append(input_sha256)
            for terms in tokenize(passages, config):
                stats.docs += 1
                stats.total_len += len(terms)
                stats.df.update(set(terms))
        fingerprint = hashlib.sha256("".join(hashes).encode()).hexdigest()
        if corpus.fingerprint and fingerprint != corpus.fingerprint:
            raise InputError(f"corpus {corpus.files[0]}: changed since its embeddings were "
                             "encoded (its fingerprint differs); re-encode it first")
        return stats


def score_columns(documents: Sequence[Sequence[str]], stats: CorpusStats,
                  config: BM25Config) -> tuple[dict, list[str]]:
    """bm25s' CSC score arrays for these documents' terms, scored with corpus-wide ``stats``
    (exactly as ``bm25s.BM25.index`` scores a whole corpus), and the terms (columns)."""
    import bm25s
    from bm25s.scoring import _build_scores_and_indices_for_matrix, _select_idf_scorer

    vocab: dict[str, int] = {}
    token_ids = [[vocab.setdefault(term, len(vocab)) for term in doc] for doc in documents]
    idf_of = _select_idf_scorer(config.method)
    idf = np.array([idf_of(stats.df[term], N=stats.docs) for term in vocab],
                   dtype=np.float32)
    pairs = sum(len(set(ids)) for ids in token_ids)  # stored (document, term) scores
    scores, rows, cols = _build_scores_and_indices_for_matrix(
        token_ids, idf, np.float64(stats.avg_len), {0: pairs}, config.k1, config.b,
        delta=0.5, nonoccurrence_array=None, method=config.method, show_progress=False)
    data, indices, indptr = bm25s.BM25._np_csc(data=scores, rows=rows, cols=cols,
                                               shape=(len(token_ids), len(vocab)))
    return {"data": data.astype(np.float32), "indices": indices, "indptr": indptr}, list(vocab)


# --------------------------------------------------------------------------- files

def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes and offsets (n + 1): strings without numpy's object arrays (pickle)."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _unpack(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = data.tobytes()
    return [raw[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def to_bytes(scores: dict, terms: Sequence[str], ids: Sequence[str]) -> bytes:
    terms_data, terms_offsets = _pack(terms)
    ids_data, ids_offsets = _pack(ids)
    buffer = io.BytesIO()
    np.savez(buffer, data=scores["data"], indices=scores["indices"].astype(np.int32),
             indptr=scores["indptr"].astype(np.int64), terms=terms_data,
             terms_offsets=terms_offsets, doc_ids=ids_data, doc_ids_offsets=ids_offsets)
    return buffer.getvalue()


def from_bytes(data: bytes, url: str) -> tuple[dict, list[str], list[str]]:
    """(CSC score arrays, terms, doc ids) of a shard file; never unpickles."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            missing = [name for name in ARRAYS if name not in arrays.files]
            if missing:
                raise InputError(f"{url}: not a BM25 shard (no {', '.join(missing)})")
            loaded = {name: arrays[name] for name in ARRAYS}
    except ValueError as err:
        raise InputError(f"{url}: not a BM25 shard ({err})") from err
    scores = {name: loaded[name] for name in ("data", "indices", "indptr")}
    return (scores, _unpack(loaded["terms"], loaded["terms_offsets"]),
            _unpack(loaded["doc_ids"], loaded["doc_ids_offsets"]))


# --------------------------------------------------------------------------- building

def identity(corpus_content: str, index_manifest: dict, config: BM25Config) -> str:
    """What finished sparse shards must match to be reused."""
    payload = {"format": FORMAT, "corpus": corpus_content, "bm25": asdict(config),
               "shards": [[s["rows"], s["ids_sha256"]] for s in index_manifest["shards"]]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _finished(folder: str, manifest: dict, wanted: str) -> bool:
    section = manifest.get(KEY) or {}
    return (section.get("identity") == wanted and section.get("format") == FORMAT and
            all(store.exists(store.join(folder, s["file"])) for s in section["shards"]))


def _shard_documents(corpus: CorpusSpec, config: BM25Config, folder: str,
                     manifest: dict) -> Iterator[tuple[int, list[list[str]], list[str]]]:
    """(shard number, its documents' terms, their ids) in order, one shard held at a time;
    each shard's ids must be the dense shard's id map, in order."""
    entries, number = manifest["shards"], 0
    terms: list[list[str]] = []
    ids: list[str] = []
    for batch_ids, passages, _ in corpus.batches():
        for doc_id, doc_terms in zip(batch_ids, tokenize(passages, config)):
            if number >= len(entries):
                raise InputError(f"corpus {corpus.files[0]}: more documents than the index "
                                 f"{folder} holds ({manifest['rows']})")
            terms.append(doc_terms)
            ids.append(doc_id)
            if len(ids) == entries[number]["rows"]:
                yield number, terms, ids
                number, terms, ids = number + 1, [], []
    if number < len(entries):
        raise InputError(f"corpus {corpus.files[0]}: fewer documents than the index {folder} "
                         f"holds ({manifest['rows']})")


def _check_ids(folder: str, entry: dict, number: int, ids: list[str]) -> None:
    import pyarrow.parquet as pq

    data = store.read_bytes(store.join(folder, entry["ids"]))
    expected = pq.read_table(io.BytesIO(data)).column("doc_id").to_pylist()
    if ids != expected:
        row = next(i for i, (a, b) in enumerate(zip(ids, expected)) if a != b)
        raise InputError(f"{folder}: dense shard {number} row {row} is doc {expected[row]!r} "
                         f"but the corpus has {ids[row]!r} there (the index was not built "
                         "from this corpus' embeddings)")


def build(folder: str, corpus: CorpusSpec, config: BM25Config | None = None) -> dict:
    """BM25 shards for the finished dense index at ``folder``; returns its manifest with the
    ``sparse`` key (``sparse.reused`` when finished shards of the same identity were there)."""
    config = config or BM25Config()
    if config.method in UNSUPPORTED_METHODS:
        raise InputError(f"BM25 method {config.method!r}: sparse shards support lucene, "
                         "robertson and atire")
    manifest = dense.read_manifest(folder)
    wanted = identity(corpus.content(), manifest, config)
    if _finished(folder, manifest, wanted):
        return {**manifest, KEY: {**manifest[KEY], "reused": True}}
    if manifest.pop(KEY, None) is not None:  # stale: unlisted before its files are replaced
        store.write_json(store.join(folder, dense.MANIFEST), manifest)
    stats = CorpusStats.count(corpus, config)
    if stats.docs != int(manifest["rows"]):
        raise InputError(f"corpus {corpus.files[0]}: {stats.docs} documents, the index "
                         f"{folder} {manifest['rows']}")
    entries = []
    for number, terms, ids in _shard_documents(corpus, config, folder, manifest):
        entry = manifest["shards"][number]
        _check_ids(folder, entry, number, ids)
        scores, vocab = score_columns(terms, stats, config)
        data = to_bytes(scores, vocab, ids)
        store.write_bytes(store.join(folder, file_name(number)), data)
        entries.append({"file": file_name(number), "rows": len(ids), "start": entry["start"],
                        "sha256": hashlib.sha256(data).hexdigest()})
    manifest[KEY] = {"format": FORMAT, "bm25": asdict(config), "identity": wanted,
                     "stats": {"docs": stats.docs, "avg_len": stats.avg_len,
                               "terms": len(stats.df)},
                     "corpus": asdict(corpus), "shards": entries}
    store.write_json(store.join(folder, dense.MANIFEST), manifest)
    return manifest


# --------------------------------------------------------------------------- loading, search

class SparseShard:
    """One BM25 shard: ``search`` answers like a dense shard (trec_eval order, ``Hit``s),
    returning only documents that share a term with the query."""

    def __init__(self, index: BM25Index, name: str = "shard"):
        self.index, self.name = index, name

    def __len__(self) -> int:
        return len(self.index.ids)

    @property
    def ids(self) -> list[str]:
        return self.index.ids

    @classmethod
    def load(cls, folder: str, number: int, manifest: dict | None = None,
             verify: bool = True) -> "SparseShard":
        """Sparse shard ``number`` of the index at ``folder``, its file checked against the
        manifest's sha256 unless ``verify`` is off."""
        manifest = manifest or dense.read_manifest(folder)
        if not has_sparse(manifest):
            raise InputError(f"{folder}: the index has no BM25 shards (build it with "
                             "`retriever index --sparse true`)")
        section = manifest[KEY]
        if not 0 <= number < len(section["shards"]):
            raise InputError(f"{folder}: no BM25 shard {number} (the index has "
                             f"{len(section['shards'])})")
        entry = section["shards"][number]
        url = store.join(folder, entry["file"])
        data = store.read_bytes(url)
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise InputError(f"{url}: sha256 does not match the index manifest (the file is "
                             "corrupt or was replaced; rebuild the index)")
        scores, terms, ids = from_bytes(data, url)
        config = BM25Config(**section["bm25"])
        return cls(BM25Index.from_columns(scores, terms, ids, config), dense.shard_name(number))

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        return self.index.search(queries, k)


def load_all(folder: str, verify: bool = True) -> list[SparseShard]:
    manifest = dense.read_manifest(folder)
    count = len((manifest.get(KEY) or {}).get("shards", [])) or 1  # none: load names why
    return [SparseShard.load(folder, n, manifest, verify) for n in range(count)]


def search_all(shards: Sequence[SparseShard], queries: Sequence[str], k: int) -> list[list[Hit]]:
    """Every shard's top-k merged into the global top-k (as the dense ``search_all``)."""
    from retriever.index.ranking import merge

    per_shard = [shard.search(queries, k) for shard in shards]
    return [merge(rows, k) for rows in zip(*per_shard)]
