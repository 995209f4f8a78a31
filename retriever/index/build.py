"""Build a sharded FAISS index from an embedding folder: :class:`IndexBuildConfig` in, the
index manifest out (:func:`build_index`).

IVF quantisers are trained once on a sample; the N shards are built in this process, or as
Ray tasks with ``workers > 0``; for IVF-PQ / HNSW recall@10 is measured against exact search
and ``nprobe`` / ``efSearch`` chosen to reach ``target_recall``. The default output folder is
``<store>/indexes/<corpus>/<model>/<type>-<N>`` when the embeddings sit at
``<store>/embeddings/<corpus>/<model>``. See :mod:`retriever.index.shards` for the format.
A finished index of the same embeddings and settings at ``out`` is reused; one of others is
refused unless ``replace`` (then rebuilt, its manifest written last). With ``sparse``, BM25
shards of the same documents and shard plan are built beside the dense ones from the corpus
the embeddings were encoded from (:mod:`retriever.index.sparse`; reused the same way).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from retriever.errors import InputError
from retriever.index import shards as sh
from retriever.io import store
from retriever.ops import local_ray


@dataclass
class IndexBuildConfig:
    """Build N FAISS shards (flat / IVF-PQ / HNSW) from an embedding dataset."""

    embeddings: str = field(metadata={"help": "embedding folder URL (parts + manifest.json)"})
    out: str | None = field(default=None, metadata={"help": "index folder URL"})
    shards: int = field(default=1, metadata={"help": "number of shards"})
    type: str = field(default="flat", metadata={"help": "index type",
                                                "choices": list(sh.TYPES)})
    factory: str | None = field(default=None,
                                metadata={"help": "explicit FAISS factory string (inner product)"})
    nlist: int | None = field(default=None, metadata={
        "help": "ivfpq: coarse centroids (default ~4 sqrt(rows), power of two)"})
    pq_m: int | None = field(default=None, metadata={
        "help": "ivfpq: PQ sub-quantisers (default ~dim/8)"})
    pq_nbits: int | None = field(default=None, metadata={
        "help": "ivfpq: bits per PQ code (default 8, fewer when the sample is small)"})
    hnsw_m: int = field(default=32, metadata={"help": "hnsw: links per node"})
    ef_construction: int = field(default=200, metadata={"help": "hnsw: efConstruction"})
    nprobe: int | None = field(default=None, metadata={
        "help": "ivfpq: nprobe (default: smallest power of two reaching --target-recall)"})
    ef_search: int | None = field(default=None, metadata={
        "help": "hnsw: efSearch (default: smallest reaching --target-recall)"})
    target_recall: float = field(default=0.95, metadata={"help": "recall@10 vs exact search"})
    recall_queries: int = field(default=1000, metadata={
        "help": "queries sampled to measure recall@10 vs exact search (0: skip)"})
    queries: str | None = field(default=None, metadata={
        "help": "embedding folder of query vectors for the recall measurement "
                "(default: sampled documents, each one's own doc excluded)"})
    refine: str = field(default="default", metadata={
        "help": "ivfpq / sq8 / binary: rescore candidates with SQ8 | SQfp16 | Flat codes, or "
                "none; default: the type's own (ivfpq SQ8, sq8 SQfp16, binary SQ8)"})
    k_factor: int = field(default=4, metadata={"help": "ivfpq: re-ranked = k_factor x k"})
    train_sample: int = field(default=100_000, metadata={"help": "IVF training sample size"})
    seed: int = 0
    gpu: str = field(default="auto", metadata={"help": "use GPU FAISS", "choices":
                                               ["auto", "yes", "no"]})
    workers: int = field(default=0, metadata={
        "help": "0: build shards in this process; W>0: as Ray tasks, at most W at a time"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "Ray CPUs per shard task"})
    sparse: bool = field(default=False, metadata={
        "help": "also build BM25 shards (same documents and shard plan) for hybrid search"})
    corpus: str | None = field(default=None, metadata={
        "help": "sparse: the corpus URL (default: the one the embeddings manifest records)"})
    replace: bool = field(default=False, metadata={
        "help": "rebuild over an index of other embeddings or settings at --out (an index "
                "of the same ones is always reused)"})


def default_out(embeddings_url: str, index_type: str, shards: int) -> str:
    parts = embeddings_url.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "embeddings":
        root = "/".join(parts[:-3])
        return store.join(root, "indexes", parts[-2], parts[-1], f"{index_type}-{shards}")
    raise InputError(f"--out is needed: {embeddings_url} is not under <store>/embeddings/"
                     "<corpus>/<model>")


def ray_runner(workers: int, cpus: float, gpu: str | bool = "auto"):
    """``run_all`` for ``shards.build``: one Ray task per shard, at most ``workers`` at once.

    Each task asks for a GPU when ``gpu`` is yes, or auto and the cluster has GPUs (wherever
    this driver runs: a CPU head still sends shards to GPU workers); the task then decides
    itself whether to use the GPU it got (``shards.build_shard``)."""
    import ray

    from retriever.modeling.device import gpus_to_request

    local_ray.init(log_to_driver=False)  # $RAY_ADDRESS under `ray job submit`, else loopback
    gpus = gpus_to_request(gpu)

    def run_all(fn, n, shared):
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(fn)
        refs = {name: ray.put(value) for name, value in shared.items()}  # shipped once
        pending, results = {}, {}
        for number in range(n):
            if len(pending) >= workers:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
            pending[task.remote(number=number, **refs)] = number
        for ref, number in pending.items():
            results[number] = ray.get(ref)
        return [results[i] for i in range(n)]

    return run_all


def _build_sparse(config: IndexBuildConfig, out: str, manifest: dict) -> dict:
    """The dense index's manifest with its BM25 shards (built, or reused when finished)."""
    from retriever.index import sparse

    corpus = sparse.CorpusSpec.of_embeddings(config.embeddings, config.corpus)
    return {**sparse.build(out, corpus), "reused": manifest.get("reused", False)}


def build_index(config: IndexBuildConfig) -> dict:
    """Build the index, or reuse the finished one at ``out`` built from the same embeddings
    with the same settings (``reused: True``); returns its manifest with ``out`` and
    ``seconds`` added."""
    search_value = config.nprobe if config.type == "ivfpq" else (
        config.ef_search if config.type == "hnsw" else None)
    spec = sh.IndexSpec(type=config.type, factory=config.factory, nlist=config.nlist,
                        pq_m=config.pq_m, pq_nbits=config.pq_nbits,
                        refine=None if config.refine.lower() == "none" else config.refine,
                        k_factor=config.k_factor, hnsw_m=config.hnsw_m,
                        ef_construction=config.ef_construction, search_value=search_value,
                        target_recall=config.target_recall)
    out = config.out or default_out(config.embeddings, config.type, config.shards)
    run_all = None
    if config.workers > 0:
        run_all = ray_runner(config.workers, config.cpus_per_worker, config.gpu)
    started = time.time()
    manifest = sh.build(config.embeddings, out, config.shards, spec,
                        train_sample=config.train_sample, recall_queries=config.recall_queries,
                        seed=config.seed, gpu=config.gpu, queries=config.queries,
                        run_all=run_all, replace=config.replace)
    if config.sparse:
        manifest = _build_sparse(config, out, manifest)
    manifest["out"] = out
    manifest["seconds"] = time.time() - started
    return manifest
