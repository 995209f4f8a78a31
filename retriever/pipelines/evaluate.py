"""Run an evaluation matrix on the cluster: every (model, dataset) cell, reused when finished.

In: a :class:`MatrixConfig`. Out: one :class:`RunRecord` per cell, each written as
``per_query.json``, ``metrics.json``, ``run.trec`` and ``provenance.json`` under
``<out>/<model>/<dataset>/``, and
the report (``retriever.evaluation.matrix_report``). A dense cell encodes the corpus on Ray
Data (``retriever.pipelines.encode``) and builds its index (``retriever.index.build``); BM25
and the dense query encoding plus search run as Ray tasks. A hybrid cell (``bm25+<model>``)
is a dense cell whose index (its dense model's) also has BM25 shards
(``retriever.index.sparse``): its Ray task merges each ranking over the shards, then fuses
the two (``retriever.index.fusion``). A finished cell (same key) is read back instead of
recomputed; embeddings and indexes under the store root are shared by matrices, reused when
their identity matches and rebuilt in place when it does not.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from retriever import console
from retriever.evaluation.matrix import (PER_QUERY, DatasetSpec, ModelSpec, RunRecord,
                                         cell_key, check_dataset_names, dataset_fingerprint,
                                         finished)
from retriever.io import store

@dataclass
class MatrixConfig:
    """A models x datasets evaluation with a comparison report."""

    models: list = field(metadata={"help": "model names/paths (or mappings in a config file)"})
    datasets: list = field(metadata={"help": "dataset folders (or mappings in a config file)"})
    matrix_id: str = field(default="default", metadata={"help": "names the output folder"})
    baseline: str = field(default="bm25", metadata={"help": "model the t-test compares against"})
    out: str | None = field(default=None, metadata={"help": "output URL"})
    index_type: str = field(default="flat", metadata={"help": "flat | ivfpq | hnsw | sq8 | binary"})
    shards: int = field(default=1, metadata={"help": "index shards per run"})
    top_k: int = 1000
    embedding_dtype: str = field(default="float32", metadata={"help": "stored vector type"})
    price_per_hour: float = field(default=0.10, metadata={
        "help": "price of the encoding hardware per hour, for cost per 1M docs"})
    hardware: str = field(default="this machine (CPU)", metadata={"help": "named in the report"})
    allow_asymmetric_encoder: bool = field(default=False, metadata={
        "help": "search an index with a query encoder unlike the index's encoder (weights, "
                "pooling, prefixes, ...) instead of refusing it"})
    mmap: bool = field(default=False, metadata={
        "help": "search memory-mapped shards (remote ones from a local cache copy) instead of "
                "reading them into memory; the results are the same"})


@dataclass
class Cell:
    """One (model, dataset) run: where it goes and what identifies it."""

    model: ModelSpec
    spec: DatasetSpec
    folder: str
    settings: dict
    model_hash: str
    data_hash: str
    key: str


def _search_task(index_folder: str, model: str, options: dict, queries: list[str], k: int,
                 allow_asymmetric: bool = False, mmap: bool = False):
    """The queries' top-k from the index, embedded by a query encoder that must match the
    index's recorded encoder (``retriever.modeling.parity``) unless ``allow_asymmetric``."""
    from retriever.index import shards as sh
    from retriever.modeling.encoder import Encoder
    from retriever.modeling.parity import check_encoder_matches, index_settings

    encoder = Encoder(model=model, **options)
    check_encoder_matches(index_settings(sh.read_manifest(index_folder)), encoder.settings(),
                          allow_asymmetric=allow_asymmetric, index_name=f"index {index_folder}")
    vectors = encoder.encode_queries(queries)
    return sh.search_all(sh.load_all(index_folder, mmap=mmap), vectors, k)


def _hybrid_task(index_folder: str, model: str, options: dict, queries: list[str], k: int,
                 fusion, allow_asymmetric: bool = False, mmap: bool = False):
    """The fused top-k: the dense and the BM25 shards' rankings, each merged to the global
    top-``depth(k)``, then fused (as the Serve app's hybrid search)."""
    from retriever.index import sparse
    from retriever.index.fusion import depth, fuse_all

    fetch = depth(k)
    dense = _search_task(index_folder, model, options, queries, fetch, allow_asymmetric, mmap)
    bm25 = sparse.search_all(sparse.load_all(index_folder), queries, fetch)
    return fuse_all(dense, bm25, k, fusion)


def _bm25_task(path: str, split: str, k: int):
    from retriever.evaluation.retrieval import bm25_run
    from retriever.io.formats import load_dataset

    return bm25_run(load_dataset(path, split), k)[0]


def plan_cell(config: MatrixConfig, model: ModelSpec, spec: DatasetSpec, files: dict,
              out: str) -> Cell:
    from retriever.modeling.registry import resolve_model

    settings = {"top_k": config.top_k, "split": spec.split}
    if not model.is_bm25:
        settings.update(index_type=config.index_type, shards=config.shards,
                        embedding_dtype=config.embedding_dtype)
    if model.fusion is not None:
        from dataclasses import asdict

        from retriever.index.bm25 import BM25Config

        settings.update(model.fusion.settings(), bm25=asdict(BM25Config()))
    model_hash = ("bm25" if model.is_bm25 else
                  resolve_model(model.dense_model or model.model).fingerprint())
    data_hash = dataset_fingerprint(files)
    return Cell(model, spec, store.join(out, model.name, spec.name), settings, model_hash,
                data_hash, cell_key(model, model_hash, data_hash, settings))


def dense_run(config: MatrixConfig, cell: Cell, queries: dict, root: str
              ) -> tuple[dict, dict, dict]:
    """Encode the corpus on Ray Data, build the index (with BM25 shards for a hybrid), search
    the queries in a Ray task (fused for a hybrid): (run, throughput, artefact folders)."""
    import ray

    from retriever.index.build import IndexBuildConfig, build_index
    from retriever.pipelines.encode import EncodeOptions, encode_corpus

    model, spec = cell.model, cell.spec
    named = f"{model.artefact_name}-{cell.model_hash}"
    emb_folder = store.join(root, "embeddings", f"{spec.name}-{cell.data_hash}", named)
    encoded = encode_corpus(spec.path, EncodeOptions(
        encoder=model.encoder_config(), embedding_dtype=config.embedding_dtype), emb_folder)
    throughput = {}
    if encoded.docs:
        throughput = {"docs": encoded.docs, "docs_per_s": encoded.docs_per_s,
                      "tokens_per_s": encoded.tokens_per_s,
                      "padding_fraction": encoded.padding_fraction}
    index_folder = store.join(root, "indexes", f"{spec.name}-{cell.data_hash}", named,
                              f"{config.index_type}-{config.shards}")
    # Shared by matrices: reused when built from these embeddings, else rebuilt in place.
    build_index(IndexBuildConfig(embeddings=emb_folder, out=index_folder, shards=config.shards,
                                 type=config.index_type, replace=True,
                                 sparse=model.fusion is not None))
    dense_model, options = model.dense_model or model.model, model.encoder_options()
    task = ray.remote(num_cpus=0.5)(_search_task if model.fusion is None else _hybrid_task)
    extra = () if model.fusion is None else (model.fusion,)
    hits = ray.get(task.remote(index_folder, dense_model, options, list(queries.values()),
                               config.top_k, *extra, config.allow_asymmetric_encoder,
                               config.mmap))
    return (dict(zip(queries, hits)), throughput,
            {"embeddings": emb_folder, "index": index_folder})


def run_cell(config: MatrixConfig, model: ModelSpec, spec: DatasetSpec, root: str,
             out: str) -> RunRecord:
    """One cell: read back when finished, else run, score and write it."""
    import ray

    from retriever.io.formats import load_dataset

    dataset = load_dataset(spec.path, spec.split)
    cell = plan_cell(config, model, spec, dataset.files, out)
    stored = finished(cell.folder, cell.key)
    if stored is not None:
        return RunRecord(model.name, spec.name, cell.folder, cell.key, True, stored)
    started = time.time()
    throughput, artefacts = {}, {}
    if model.is_bm25:
        run = ray.get(ray.remote(num_cpus=0.5)(_bm25_task).remote(spec.path, spec.split,
                                                                   config.top_k))
    else:
        run, throughput, artefacts = dense_run(config, cell, dataset.judged_queries(), root)
    return write_cell(cell, dataset, run, {"throughput": throughput, **artefacts}, started)


def write_cell(cell: Cell, dataset, run: dict, provenance: dict, started: float) -> RunRecord:
    """Score ``run`` once and write the cell: ``per_query.json`` (every judged query's value
    of each metric, unrounded: the report's means and t-test both read it), ``metrics.json``
    (their means), ``run.trec`` and ``provenance.json`` (last: it marks the cell finished)."""
    from retriever.evaluation.metrics import per_query
    from retriever.evaluation.retrieval import score_run
    from retriever.index.ranking import write_trec
    from retriever.provenance import code_version, now

    model, spec = cell.model, cell.spec
    result = score_run(dataset, run)
    result.update({"dataset": spec.name, "model": model.name, "split": spec.split,
                   "settings": cell.settings, "seconds": time.time() - started})
    store.write_json(store.join(cell.folder, PER_QUERY), per_query(dataset.qrels, run))
    write_trec(run, store.join(cell.folder, "run.trec"), tag=model.name)
    store.write_json(store.join(cell.folder, "metrics.json"), result)
    store.write_json(store.join(cell.folder, "provenance.json"), {
        "key": cell.key, "model": model.model, "model_options": model.encoder_options(),
        "model_hash": cell.model_hash, "dataset": spec.path, "dataset_hash": cell.data_hash,
        "dataset_files": dataset.files, "settings": cell.settings, **provenance,
        "code_version": code_version(), "created": now()})
    return RunRecord(model.name, spec.name, cell.folder, cell.key, False, result)


def output_folder(config: MatrixConfig) -> str:
    out = config.out or store.join(store.default_root(), "evals", config.matrix_id)
    return out if store.has_scheme(out) else os.path.abspath(out)


def run_matrix(config: MatrixConfig) -> tuple[list[RunRecord], str]:
    """Every cell (one result line each), then the report; returns the records and the
    report's markdown."""
    from retriever.evaluation.matrix_report import write_report

    models = [ModelSpec.parse(m) for m in config.models]
    datasets = [DatasetSpec.parse(d) for d in config.datasets]
    check_dataset_names(models, datasets)
    cells = [(spec, model) for spec in datasets for model in models if model.runs_on(spec.name)]
    root, out = store.default_root(), output_folder(config)
    console.ray_init()
    records: list[RunRecord] = []
    progress = console.Progress("evaluate", len(cells), "runs")
    for spec, model in cells:
        record = run_cell(config, model, spec, root, out)
        records.append(record)
        progress.write(f"[{len(records)}/{progress.total}] {model.name} on {spec.name}: "
                       f"ndcg@10 {record.metrics['ndcg@10']:.4f} "
                       f"({'reused' if record.reused else 'computed'})", advance=1)
    progress.close()
    return records, write_report(config, records, out)
