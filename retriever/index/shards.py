"""Sharded FAISS indexes: build N shards from an embedding dataset, load one, search it.

Layout under one index folder URL::

    shard-00000.faiss         the shard in FAISS' own format (faiss.serialize_index; no pickle),
                              rescoring store included (IndexRefine keeps it in the same file)
    shard-00000.ids.parquet   one ``doc_id`` string column: row r names FAISS label r
    trained.faiss             IVF / SQ types: the empty trained index (quantiser, codebooks,
                              SQ ranges), trained once
    manifest.json             written last; an index without it is incomplete

Shard ``s`` of ``n`` holds the contiguous row range ``[s*rows//n, (s+1)*rows//n)`` of the
embedding dataset (manifest order), so a shard is built by reading only the parts it
overlaps, and shards can be built in parallel (``jobs/index.py`` runs them as Ray tasks).

Types (all inner product; with L2-normalised embeddings that is cosine), their factory
strings and bytes per vector: :mod:`retriever.index.types` (``IndexSpec``, re-exported here).

- ``flat``: ``Flat`` (exact).
- ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}np,Refine(SQ8)``: IVF lists of PQ codes (``np``: no
  polysemous training, which is slow and unused here), whose candidates (``k_factor`` x k) are
  re-ranked with 8-bit scalar-quantised vectors. PQ alone tops out below 0.95 recall@10 on
  real embeddings (MiniLM/SciFact: 0.94 with 192 two-dimensional sub-quantisers); the SQ8
  re-rank costs d bytes a vector and lifts it to ~0.99 (PQ48 + SQ8 = 432 B vs 1,536 B flat
  for d=384). ``--refine none`` gives plain IVF-PQ. The coarse quantiser, PQ codebooks and SQ
  ranges are trained ONCE on a uniform sample of the whole dataset and that trained, empty
  index is the start of every shard, so all shards share them. ``nprobe`` is chosen as the
  smallest power of two whose recall@10 against exact search reaches the target.
- ``hnsw``: ``HNSW{M},Flat``; ``efSearch`` chosen the same way.
- ``sq8``: ``SQ8,Refine(SQfp16)``: an 8-bit scalar-quantised scan whose ``k_factor`` x k best
  are rescored by their fp16 vectors; ``k_factor`` chosen the same way.
- ``binary``: ``LSH,Refine(SQ8)``: sign bits searched by Hamming distance, the ``k_factor`` x
  k nearest rescored by SQ8 codes; ``k_factor`` chosen the same way.

Loading: :meth:`IndexShard.load` reads a shard into memory, or with ``mmap=True`` maps it
(``faiss.IO_FLAG_MMAP_IFC``: code stores, IVF lists and rescoring stores stay in the page
cache); a remote shard is then mapped from a local copy named by its sha256 under the shard
cache (:func:`cached_copy`), checked once when it is copied. Id maps are held as one Arrow
string array (:mod:`retriever.index.idmap`, no Python object per id); with ``mmap=True`` they
are memory-mapped too, from an Arrow IPC copy of the parquet id map under the same cache
(:func:`cached_ids`, named by the id map's sha256, local and remote indexes alike), so a
searcher's own memory does not grow with its shard.

Recall@k is measured while building: a sample of documents serves as queries (each one's own
document excluded from both rankings); every shard reports its exact and approximate top-k
for them, and the merged rankings are compared, exactly as the serve router merges them.

GPU FAISS is used where a GPU is usable (``gpu_count() > 0``: a GPU build of FAISS, and a GPU
Ray assigned to the task or actor doing the work, or, outside Ray, one CUDA shows): k-means of
the IVF quantiser runs on all GPUs of the driver, each shard task decides for itself, and
flat shards are searched there. Shards are always written from the CPU form.

Manifest keys: ``format`` ("retriever.index/1"), ``type``, ``factory``, ``metric``, ``dim``,
``rows``, ``shards`` (list of {"index", "ids", "rows", "start", "bytes", "sha256",
"ids_sha256"}), ``bytes_per_vector`` ({"measured": the shard files' bytes / rows, "planned":
the capacity plan's figure for the same factory, "planned_per_vector",
"planned_fixed_per_shard", "planner_error"}), ``search_params`` ({"nprobe": n, "k_factor": f}
/ {"efSearch": n} / {"k_factor": f} / {}), ``recall`` (at, value, queries, param, chosen,
reached, per search parameter; every type but flat), ``train`` (sample size, seed), ``gpu``,
``source`` (embeddings URL, its manifest's sha256, encoder settings, dtype, rows), ``identity`` (what a rebuild must match
for the index to be reused: the embeddings' part checksums and the build settings),
``code_version``, ``created``. Loading checks every shard and id map against its sha256.

Search results follow trec_eval's order (``retriever.index.ranking``): a few extra neighbours are
fetched per shard so a tie at the cut-off is broken by doc id, and the merge of the shards'
top-k lists (``ranking.merge``) equals the top-k of one flat index over all documents.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import faiss
import numpy as np
import pyarrow as pa

from retriever import provenance
from retriever.io import embeddings, store
from retriever.errors import InputError
from retriever.index import idmap
from retriever.index.exact import ExactSearcher, search_index, to_gpu_if_available
from retriever.index.idmap import IdMap
from retriever.index.ranking import Hit, merge
from retriever.index.types import (  # noqa: F401  (re-exported: shards.IndexSpec etc.)
    METRIC, MIN_POINTS_PER_CENTROID, PARAM, TYPES, IndexSpec, footprint, new_index,
    set_search_params)

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = "retriever.index/1"
MANIFEST = "manifest.json"
TRAINED = "trained.faiss"


def shard_name(number: int) -> str:
    """How answers, logs and ``/info`` name shard ``number``."""
    return f"shard-{number}"


def index_name(number: int) -> str:
    return f"shard-{number:05d}.faiss"


def ids_name(number: int) -> str:
    return f"shard-{number:05d}.ids.parquet"


def shard_range(rows: int, number: int, shards: int) -> tuple[int, int]:
    """The embedding rows ``[start, stop)`` held by shard ``number`` of ``shards``."""
    return number * rows // shards, (number + 1) * rows // shards


def gpu_count() -> int:
    """GPUs FAISS may use here (``retriever.index.exact.faiss_gpu_count``)."""
    from retriever.index.exact import faiss_gpu_count

    return faiss_gpu_count()


def use_gpu(setting: str | bool = "auto") -> bool:
    """``auto`` (GPU when present), ``yes``/True or ``no``/False, decided where it is called:
    call it in the task that does the work, not in the driver that schedules it."""
    if isinstance(setting, bool):
        wanted = setting
    elif setting in ("auto", "yes", "no"):
        wanted = gpu_count() > 0 if setting == "auto" else setting == "yes"
    else:
        raise ValueError(f"gpu {setting!r}: expected auto, yes or no")
    if wanted and gpu_count() == 0:
        raise InputError("gpu=yes but FAISS sees no GPU here (install the `gpu` extra, check "
                         "CUDA, and give the Ray task or actor a GPU)")
    return wanted


# --------------------------------------------------------------------------- FAISS bytes

def to_bytes(index: "faiss.Index") -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes) -> "faiss.Index":
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


# --------------------------------------------------------------------------- building

@contextlib.contextmanager
def gpu_clustering(index: "faiss.Index", dim: int) -> Iterator["faiss.Index | None"]:
    """While the block runs, the k-means of an IVF ``index`` assigns points on all GPUs.

    ``clustering_index`` is a plain SWIG pointer that neither owns nor keeps alive what is
    assigned to it: the GPU index is held here until the block ends, then detached (as FAISS'
    own examples keep it in a variable). Not an IVF index: nothing changes (yields None).
    """
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        yield None
        return
    clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
    ivf.clustering_index = clustering
    try:
        yield clustering
    finally:
        ivf.clustering_index = None


def train(factory: str, vectors: np.ndarray, gpu: bool = False) -> bytes:
    """An empty index with its quantiser / codebooks trained on ``vectors`` (FAISS bytes)."""
    index = new_index(factory, vectors.shape[1])
    if not index.is_trained:
        with gpu_clustering(index, vectors.shape[1]) if gpu else contextlib.nullcontext():
            index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return to_bytes(index)


@dataclass
class RecallProbe:
    """Queries for measuring recall while building; ``exclude`` drops each query's own doc."""

    vectors: np.ndarray
    ids: list[str]
    exclude_self: bool = True


def _drop_self(hits: list[list[Hit]], probe: RecallProbe, k: int) -> list[list[Hit]]:
    if not probe.exclude_self:
        return [h[:k] for h in hits]
    return [[h for h in row if h[0] != qid][:k] for row, qid in zip(hits, probe.ids)]


def build_shard(embeddings_url: str, number: int, shards: int, spec: IndexSpec, factory: str,
                out: str, trained: bytes | None = None, probe: RecallProbe | None = None,
                gpu: str | bool = False, add_batch: int = 65536) -> dict:
    """Build shard ``number`` and write it and its id map under ``out``.

    ``gpu`` is the setting (auto / yes / no), resolved here, in the task that builds the shard.

    Returns its manifest entry; with a ``probe``, also ``probe_exact`` (exact top-k of this
    shard for the probe queries) and ``probe_approx`` ({search value: top-k}).
    """
    gpu = use_gpu(gpu)
    manifest = embeddings.read_manifest(embeddings_url)
    dim = int(manifest["dim"])
    start, stop = shard_range(int(manifest["rows"]), number, shards)
    index = from_bytes(trained) if trained is not None else new_index(factory, dim)
    if spec.type == "hnsw" and not spec.factory:
        faiss.downcast_index(index).hnsw.efConstruction = spec.ef_construction
    k = spec.recall_at + (1 if probe is not None and probe.exclude_self else 0)
    exact: list[list[Hit]] | None = None
    ids: list[str] = []
    for block_ids, vectors in embeddings.read_rows(embeddings_url, manifest, start, stop):
        for lo in range(0, len(block_ids), add_batch):
            chunk = np.ascontiguousarray(vectors[lo:lo + add_batch])
            chunk_ids = block_ids[lo:lo + add_batch]
            index.add(chunk)
            if probe is not None and spec.measures_recall:
                found = ExactSearcher(chunk, chunk_ids, use_gpu=gpu).search(probe.vectors, k)
                exact = found if exact is None else [merge(pair, k)
                                                     for pair in zip(exact, found)]
            ids.extend(chunk_ids)
    if index.ntotal != stop - start:
        raise InputError(f"{embeddings_url}: shard {number} got {index.ntotal} rows, "
                         f"expected {stop - start}")
    data = to_bytes(index)
    store.write_bytes(store.join(out, index_name(number)), data)
    ids_table = pa.table({"doc_id": pa.array(ids, pa.string())})
    ids_url = store.join(out, ids_name(number))
    store.write_parquet(ids_table, ids_url)
    entry = {"index": index_name(number), "ids": ids_name(number), "rows": len(ids),
             "start": start, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "ids_sha256": embeddings.sha256_of(ids_url), "gpu": gpu}
    if probe is not None and spec.measures_recall:
        shard = IndexShard(index, ids, spec.type, name=shard_name(number))
        entry["probe_exact"] = _drop_self(exact or [[] for _ in probe.ids], probe,
                                          spec.recall_at)
        entry["probe_approx"] = {}
        for value in spec.search_candidates(index):
            shard.set_search_params(spec.search_params(value))
            entry["probe_approx"][value] = _drop_self(shard.search(probe.vectors, k), probe,
                                                      spec.recall_at)
    return entry


def recall(exact: list[list[Hit]], approx: list[list[Hit]]) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|."""
    values = [len({d for d, _ in a} & {d for d, _ in e}) / len(e)
              for e, a in zip(exact, approx) if e]
    return float(np.mean(values)) if values else 1.0


PLATEAU = 0.005  # recall this close to the best counts as the best (target out of reach)


def merge_probe(entries: list[dict], spec: IndexSpec) -> dict:
    """Merged recall per search value, and the chosen value: the smallest reaching the target;
    when none does (``reached`` false: the candidates or re-rank codes cap recall, not the
    search value), the smallest within ``PLATEAU`` of the best, not the costliest."""
    k = spec.recall_at
    exact = [merge(rows, k) for rows in zip(*(e.pop("probe_exact") for e in entries))]
    approx_by_value = [e.pop("probe_approx") for e in entries]
    values = sorted({int(v) for a in approx_by_value for v in a})
    per_value = {}
    for value in values:
        merged = [merge(rows, k) for rows in zip(*(a[value] for a in approx_by_value))]
        per_value[value] = recall(exact, merged)
    reaching = [v for v in values if per_value[v] >= spec.target_recall]
    best = max(per_value.values(), default=0.0)
    chosen = (reaching or [v for v in values if per_value[v] >= best - PLATEAU])[0]
    return {"at": k, "value": per_value[chosen], "chosen": chosen, "target": spec.target_recall,
            "reached": bool(reaching),
            "queries": len(exact), "param": spec.param or "none",
            "per_value": {str(v): per_value[v] for v in values}}


def _content(manifest: dict) -> list:
    """What an embedding folder holds, by its parts' checksums (not when or where written)."""
    return [manifest["dim"], manifest.get("dtype"), manifest["rows"],
            [[part["file"], part["rows"], part["sha256"]] for part in manifest["parts"]]]


def build_identity(source: dict, shards: int, spec: IndexSpec, train_sample: int,
                   recall_queries: int, seed: int, queries: str | None) -> str:
    """What a finished index must match to be reused: the embeddings' content, the recall
    queries' content and every build setting (not the GPU, which only changes the speed)."""
    payload = {"embeddings": _content(source), "shards": shards, "spec": asdict(spec),
               "train_sample": train_sample, "recall_queries": recall_queries, "seed": seed,
               "queries": _content(embeddings.read_manifest(queries)) if queries else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def finished_index(out: str, identity: str) -> dict | None:
    """The manifest of the complete index under ``out`` when it has this identity, else None."""
    url = store.join(out, MANIFEST)
    if not store.exists(url):
        return None
    manifest = store.read_json(url)
    if manifest.get("format") != FORMAT or manifest.get("identity") != identity:
        return None
    files = [entry[key] for entry in manifest["shards"] for key in ("index", "ids")]
    if not all(store.exists(store.join(out, name)) for name in files):
        return None
    return manifest


def _check_build(embeddings_url: str, out: str, shards: int, rows: int, replace: bool) -> None:
    if shards < 1:
        raise InputError(f"shards must be >= 1, got {shards}")
    if rows < shards:
        raise InputError(f"{embeddings_url}: {rows} rows cannot fill {shards} shards")
    if not replace and store.exists(store.join(out, MANIFEST)):
        raise InputError(f"{out}: already holds an index (manifest.json) of other embeddings "
                         "or settings; choose another --out, or --replace it")


def _retract(out: str) -> None:
    """Remove an old index's manifest before its files are overwritten, so that a rebuild
    cut short leaves an incomplete index, never a manifest naming files it did not write."""
    url = store.join(out, MANIFEST)
    if store.exists(url):
        fs, path = store.filesystem(url)
        fs.rm_file(path)


def _train_once(embeddings_url: str, source: dict, out: str, spec: IndexSpec, factory: str,
                train_rows: int, seed: int, on_gpu: bool) -> tuple[bytes | None, dict,
                                                                   "faiss.Index"]:
    """(trained empty index bytes or None, the manifest's ``train``, an index to read the
    search candidates from); IVF quantisers and codebooks are trained here, once."""
    probe_index = new_index(factory, int(source["dim"]))
    if probe_index.is_trained:
        return None, {}, probe_index
    if spec.type == "ivfpq" and not spec.factory:
        nlist = faiss.extract_index_ivf(probe_index).nlist
        if nlist * MIN_POINTS_PER_CENTROID > train_rows:
            raise InputError(f"nlist {nlist} needs >= {nlist * MIN_POINTS_PER_CENTROID} "
                             f"training vectors, {train_rows} available; lower --nlist")
    _, sample = embeddings.sample_rows(embeddings_url, source, train_rows, seed)
    trained = train(factory, sample, on_gpu)
    store.write_bytes(store.join(out, TRAINED), trained)
    train_info = {"sample": len(sample), "seed": seed, "file": TRAINED,
                  "sha256": hashlib.sha256(trained).hexdigest()}
    return trained, train_info, from_bytes(trained)


def _recall_probe(embeddings_url: str, source: dict, queries: str | None, size: int,
                  seed: int) -> RecallProbe:
    """``size`` query vectors from the ``queries`` embedding folder, else sampled documents
    (whose own document is then excluded from both rankings)."""
    if not queries:
        ids, vectors = embeddings.sample_rows(embeddings_url, source, size, seed)
        return RecallProbe(vectors, ids, exclude_self=True)
    query_manifest = embeddings.read_manifest(queries)
    if int(query_manifest["dim"]) != int(source["dim"]):
        raise InputError(f"{queries}: query vectors have {query_manifest['dim']} dims, "
                         f"the embeddings {source['dim']}")
    ids, vectors = embeddings.sample_rows(queries, query_manifest, size, seed)
    return RecallProbe(vectors, ids, exclude_self=False)


def build(embeddings_url: str, out: str, shards: int, spec: IndexSpec, *,
          train_sample: int = 100_000, recall_queries: int = 1000, seed: int = 0,
          gpu: str | bool = "auto", queries: str | None = None,
          run_all: Callable[..., list[dict]] | None = None, replace: bool = False) -> dict:
    """Build ``shards`` shards of ``embeddings_url`` under ``out``; returns the manifest.

    A finished index under ``out`` with the same identity (:func:`build_identity`) is reused:
    its manifest is returned with ``reused: True``. One of other embeddings or settings is
    refused, or rebuilt in place with ``replace`` (old manifest removed first, new one last).

    ``run_all(fn, n, shared)`` runs ``fn(number, **shared)`` for numbers 0..n-1 and returns
    the results in order (default: sequentially in this process; ``jobs/index.py`` passes one
    that runs Ray tasks and ships ``shared``, the trained index bytes and recall queries, once
    through the object store).
    Recall is measured with ``recall_queries`` vectors sampled from ``queries`` (an embedding
    folder of query vectors) or, without it, from the documents themselves (own doc excluded).
    """
    source = embeddings.read_manifest(embeddings_url)
    rows, dim = int(source["rows"]), int(source["dim"])
    identity = build_identity(source, shards, spec, train_sample, recall_queries, seed, queries)
    existing = finished_index(out, identity)
    if existing is not None:
        return {**existing, "reused": True}
    _check_build(embeddings_url, out, shards, rows, replace)
    # Training runs here; the shards decide for themselves where they run (``build_shard``).
    on_gpu = use_gpu("auto" if run_all and gpu in ("yes", True) else gpu)
    train_rows = min(train_sample, rows)
    factory = spec.factory_string(dim, rows, train_rows)
    _retract(out)
    trained, train_info, probe_index = _train_once(embeddings_url, source, out, spec, factory,
                                                   train_rows, seed, on_gpu)
    probe = (_recall_probe(embeddings_url, source, queries, recall_queries, seed + 1)
             if spec.measures_recall and recall_queries > 0 else None)
    shared = {"embeddings_url": embeddings_url, "shards": shards, "spec": spec,
              "factory": factory, "out": out, "trained": trained, "probe": probe,
              "gpu": gpu}
    entries = (run_all(build_shard, shards, shared) if run_all else
               [build_shard(number=n, **shared) for n in range(shards)])
    on_gpu = any([on_gpu] + [entry.pop("gpu") for entry in entries])
    recall_info = merge_probe(entries, spec) if probe is not None else None
    if recall_info is not None:
        recall_info["queries_from"] = queries or "sampled documents (own doc excluded)"
    search_value = (spec.search_value or (recall_info or {}).get("chosen")
                    or (spec.search_candidates(probe_index) or [None])[-1])
    manifest = {
        "format": FORMAT, "type": spec.type, "factory": factory, "metric": METRIC, "dim": dim,
        "rows": rows, "shards": entries,
        "bytes_per_vector": bytes_per_vector(entries, factory, dim),
        "search_params": spec.search_params(search_value),
        "recall": recall_info, "train": train_info, "gpu": on_gpu, "spec": asdict(spec),
        "identity": identity, "source": _source(embeddings_url, source),
        "code_version": provenance.code_version(), "created": provenance.now(),
    }
    store.write_json(store.join(out, MANIFEST), manifest)
    return manifest


def _source(embeddings_url: str, source: dict) -> dict:
    """The manifest's ``source``: which embeddings, by URL and manifest checksum."""
    return {"embeddings": embeddings_url,
            "manifest_sha256": embeddings.sha256_of(store.join(embeddings_url,
                                                               embeddings.MANIFEST)),
            "encoder": source.get("encoder", {}), "dtype": source.get("dtype"),
            "rows": int(source["rows"])}


def bytes_per_vector(entries: list[dict], factory: str, dim: int) -> dict:
    """The manifest's ``bytes_per_vector``: the shard files' bytes over their rows (measured),
    next to what :func:`retriever.index.types.footprint` (the capacity plan's arithmetic)
    predicts for the same factory, shards and rows. The id maps (parquet) are not counted."""
    rows = sum(entry["rows"] for entry in entries)
    measured = sum(entry["bytes"] for entry in entries) / rows
    try:
        planned = footprint(factory, dim)
    except InputError:  # an explicit factory string the planner has no arithmetic for
        return {"measured": round(measured, 3), "planned": None}
    predicted = sum(planned.shard_bytes(entry["rows"]) for entry in entries) / rows
    return {"measured": round(measured, 3), "planned": round(predicted, 3),
            "planned_per_vector": planned.per_vector,
            "planned_fixed_per_shard": planned.fixed,
            "planner_error": round(predicted / measured - 1, 5)}


# --------------------------------------------------------------------------- loading, searching

def read_manifest(folder: str) -> dict:
    return embeddings.read_manifest(folder, FORMAT, "the index")


def _refuse_changed(url: str, digest: "hashlib._Hash", expected: str) -> None:
    """Refuse a file whose bytes are not the ones the index manifest recorded."""
    if digest.hexdigest() != expected:
        raise InputError(f"{url}: sha256 does not match the index manifest (the file is "
                         "corrupt or was replaced; rebuild the index)")


def _check_sha256(local: str, url: str, expected: str | None) -> None:
    """Check a local file in blocks (a shard may be larger than the memory spare), read into
    one reused 1 MiB buffer: a fresh block a read would leave its size of freed heap behind
    (glibc keeps it), which a memory-mapped searcher would carry for nothing."""
    if expected is None:
        return
    digest, block = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(block)
    with open(local, "rb", buffering=0) as handle:
        while size := handle.readinto(block):
            digest.update(view[:size])
    _refuse_changed(url, digest, expected)


def cache_folder(cache_dir: str | None = None) -> str:
    """Where remote shards are copied for memory mapping: ``cache_dir``, else
    ``$RETRIEVER_SHARD_CACHE``, else ``~/.cache/retriever/shards``."""
    return (cache_dir or os.environ.get("RETRIEVER_SHARD_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "retriever", "shards"))


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _cache_path(cache_dir: str | None, name: str) -> str:
    folder = cache_folder(cache_dir)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def _into_cache(final: str, make: Callable[[str], T]) -> T:
    """``make(path)`` writes (and checks) a file at a temporary name beside ``final``; only
    when it returns is the file renamed to ``final`` (atomically: a reader sees a whole,
    checked file or none). Returns what ``make`` returned."""
    partial = tempfile.NamedTemporaryFile(dir=os.path.dirname(final), delete=False,
                                          prefix=f".{os.path.basename(final)[:16]}-")
    partial.close()
    try:
        made = make(partial.name)
        os.replace(partial.name, final)
    finally:
        if os.path.exists(partial.name):
            os.remove(partial.name)
    return made


def cached_copy(url: str, sha256: str, cache_dir: str | None = None) -> str:
    """A local copy of the remote file ``url`` whose content is ``sha256``, named by it.

    The copy is downloaded beside its final name, checked against ``sha256``, then renamed
    into place, so a file under its final name was verified once and is reused as is by
    every later load (the name is the content's checksum: a changed shard gets a new name).
    """
    final = _cache_path(cache_dir, f"{sha256}.faiss")
    if os.path.exists(final):
        return final
    fs, path = store.filesystem(url)

    def fetch(local: str) -> None:
        fs.get(path, local)
        _check_sha256(local, url, sha256)

    _into_cache(final, fetch)
    return final


def cached_ids(url: str, sha256: str, cache_dir: str | None = None,
               check: bool = True) -> IdMap:
    """The id map at ``url`` (parquet, content ``sha256``) memory-mapped from an Arrow IPC
    copy ``<sha256>.ids.arrow`` under the shard cache (:mod:`retriever.index.idmap`).

    The copy is made from the source once its bytes matched ``sha256``, written beside its
    final name and renamed into place (as :func:`cached_copy`). A copy found there is used
    only if it names that source and (``check``: read once) its content checksum holds; a
    corrupt, truncated or foreign copy is made again, never used. Cache files are replaced
    (renamed over), never rewritten in place: a mapped file rewritten in place would fault
    every process that maps it (SIGBUS)."""
    final = _cache_path(cache_dir, f"{sha256}.ids.arrow")
    if os.path.exists(final):
        reused = idmap.open_mapped(final, sha256, check)
        if reused is not None:
            return reused
        log.warning("%s: not a valid copy of %s; making it again", final, url)
    mapped = _into_cache(final, lambda local: idmap.write_mapped(_read_ids(url, sha256),
                                                                   local, sha256))
    pa.default_memory_pool().release_unused()  # the in-memory table it was made from
    return mapped


def read_index(url: str, sha256: str | None = None, mmap: bool = False,
                cache_dir: str | None = None) -> "faiss.Index":
    """FAISS reads local files itself; a remote shard is downloaded to a temporary file, or
    with ``mmap`` to the shard cache (:func:`cached_copy`, which needs the ``sha256``).
    With ``sha256`` the file is checked against it first.

    ``mmap``: ``IO_FLAG_MMAP_IFC`` maps the file instead of reading it: flat and SQ/LSH code
    stores, IVF inverted lists and refine stores stay in the page cache (paged in as searches
    touch them), so the process holds a small part of the shard's bytes."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    if store.is_local(url):
        local = _local_path(url)
        _check_sha256(local, url, sha256)
        return faiss.read_index(local, flags)
    if mmap:
        if sha256 is None:
            raise InputError(f"{url}: a remote shard is memory-mapped from a cache copy named "
                             "by its sha256; load it with verify on")
        return faiss.read_index(cached_copy(url, sha256, cache_dir), flags)
    fs, path = store.filesystem(url)
    with tempfile.TemporaryDirectory(prefix="retriever-shard-") as tmp:
        local = os.path.join(tmp, "shard.faiss")
        fs.get(path, local)
        _check_sha256(local, url, sha256)
        return faiss.read_index(local)


def _read_ids(url: str, sha256: str | None = None) -> IdMap:
    """A shard's id map, in memory; with ``sha256`` its bytes are checked against it first."""
    data = store.read_bytes(url)
    if sha256 is not None:
        _refuse_changed(url, hashlib.sha256(data), sha256)
    ids = idmap.from_parquet(data, url)
    # Decoding parquet leaves freed buffers in Arrow's allocator (mimalloc keeps them, a few
    # times the id map's size); handed back here so they do not stay with a searcher.
    pa.default_memory_pool().release_unused()
    return ids


class IndexShard:
    """One FAISS shard of an index and its id map; ``search`` answers in trec_eval order."""

    def __init__(self, index: "faiss.Index", ids: Sequence[str] | IdMap,
                 index_type: str = "flat", name: str = "shard",
                 search_params: dict | None = None):
        if index.ntotal != len(ids):
            raise InputError(f"{name}: index holds {index.ntotal} vectors, id map {len(ids)}")
        self.index, self.ids, self.type, self.name = index, IdMap.of(ids), index_type, name
        self.dim = index.d
        self.search_params: dict = {}
        self.set_search_params(search_params or {})

    def __len__(self) -> int:
        return len(self.ids)

    def set_search_params(self, params: dict) -> None:
        set_search_params(self.index, params)
        self.search_params = {**self.search_params, **params}

    @classmethod
    def load(cls, folder: str, number: int, manifest: dict | None = None,
             gpu: str | bool = "auto", verify: bool = True, mmap: bool = False,
             cache_dir: str | None = None) -> "IndexShard":
        """Shard ``number`` of the index at ``folder``; ``verify`` (default) checks the shard
        and its id map against the manifest's sha256 (off only to save reading huge shards
        twice where the storage itself is trusted). ``mmap`` maps the shard file instead of
        reading it (see :func:`read_index`; a remote shard is mapped from a verified local
        copy under ``cache_dir``) and keeps it on the CPU; its id map is mapped too, from an
        Arrow copy under ``cache_dir`` (:func:`cached_ids`)."""
        manifest = manifest or read_manifest(folder)
        if not 0 <= number < len(manifest["shards"]):
            raise InputError(f"{folder}: no shard {number} (the index has "
                             f"{len(manifest['shards'])})")
        entry = manifest["shards"][number]
        url = store.join(folder, entry["index"])
        index = read_index(url, entry["sha256"] if verify or mmap and not store.is_local(url)
                            else None, mmap, cache_dir)
        ids_url = store.join(folder, entry["ids"])
        ids = (cached_ids(ids_url, entry["ids_sha256"], cache_dir, check=verify) if mmap else
               _read_ids(ids_url, entry["ids_sha256"] if verify else None))
        if manifest["type"] == "flat" and not mmap and use_gpu(gpu):
            index = to_gpu_if_available(index)
        return cls(index, ids, manifest["type"], shard_name(number),
                   manifest.get("search_params", {}))

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        return search_index(self.index, self.ids, queries, k)


def load_all(folder: str, gpu: str | bool = "auto", verify: bool = True, mmap: bool = False,
             cache_dir: str | None = None) -> list[IndexShard]:
    """Every shard of the index at ``folder`` (arguments as :meth:`IndexShard.load`)."""
    manifest = read_manifest(folder)
    return [IndexShard.load(folder, n, manifest, gpu, verify, mmap, cache_dir)
            for n in range(len(manifest["shards"]))]


def search_all(shards: Sequence[IndexShard], queries: np.ndarray, k: int) -> list[list[Hit]]:
    """Every shard's top-k merged into the global top-k (what the serve router does)."""
    per_shard = [shard.search(queries, k) for shard in shards]
    return [merge(rows, k) for rows in zip(*per_shard)]


def group_numbers(shards: int, per_group: int) -> list[list[int]]:
    """Shard numbers 0..shards-1 dealt in order to groups of ``per_group`` (the last may be
    smaller): the shards each searcher of a serving app holds."""
    if per_group < 1:
        raise InputError(f"shards per searcher must be >= 1, got {per_group}")
    return [list(range(start, min(start + per_group, shards)))
            for start in range(0, shards, per_group)]
