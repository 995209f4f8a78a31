"""Evaluate a models x datasets matrix on the cluster: ``retriever evaluate --config FILE``.

Per dense run: encode the corpus with the Ray Data encode job, build the index with the index
job (flat or the configured type), encode the queries and search as a Ray task, score. BM25 runs
as a Ray task. Each run writes ``metrics.json``, ``run.trec`` and ``provenance.json`` under
``<out>/<model>/<dataset>/``; the matrix writes ``report.md``, ``ndcg.png`` and ``report.html``
under ``<out>`` (default ``<store>/evals/<matrix_id>``). Finished runs are reused.

Example config::

    matrix_id: classic
    baseline: bm25
    models: [bm25, minilm, {name: smollm2-zs, model: smollm2-135m, prompt: one-word}]
    datasets: [../shared/datasets/cranfield, {name: scifact, path: ../shared/datasets/scifact}]
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.io import store
from retriever.evaluation.matrix import (DatasetSpec, ModelSpec, RunRecord, dataset_fingerprint, finished,
                              run_key)


@dataclass
class MatrixConfig:
    """A models x datasets evaluation with a comparison report."""

    models: list = field(metadata={"help": "model names/paths (or mappings in a config file)"})
    datasets: list = field(metadata={"help": "dataset folders (or mappings in a config file)"})
    matrix_id: str = field(default="default", metadata={"help": "names the output folder"})
    baseline: str = field(default="bm25", metadata={"help": "model the t-test compares against"})
    out: str | None = field(default=None, metadata={"help": "output URL"})
    index_type: str = field(default="flat", metadata={"help": "flat | ivfpq | hnsw"})
    shards: int = field(default=1, metadata={"help": "index shards per run"})
    top_k: int = 1000
    embedding_dtype: str = field(default="float32", metadata={"help": "stored vector type"})
    price_per_hour: float = field(default=0.10, metadata={
        "help": "price of the encoding hardware per hour, for cost per 1M docs"})
    hardware: str = field(default="this machine (CPU)", metadata={"help": "named in the report"})


def _search_task(index_folder: str, model: str, options: dict, queries: list[str], k: int):
    from retriever.index import shards as sh
    from retriever.modeling.encoder import Encoder

    encoder = Encoder(model=model, **options)
    vectors = encoder.encode_queries(queries)
    return sh.search_all(sh.load_all(index_folder), vectors, k)


def _bm25_task(path: str, split: str, k: int):
    from retriever.io.formats import load_dataset
    from retriever.evaluation.runs import bm25_run

    return bm25_run(load_dataset(path, split), k)[0]


def run_cell(config: MatrixConfig, model: ModelSpec, spec: DatasetSpec, root: str,
             out: str) -> RunRecord:
    import ray

    from jobs.encode import EncodeConfig
    from jobs.encode import run as encode
    from jobs.index import IndexConfig
    from jobs.index import run as index
    from retriever.io.formats import load_dataset
    from retriever.provenance import code_version, now
    from retriever.evaluation.runs import score_run
    from retriever.modeling.registry import resolve_model
    from retriever.index.ranking import write_trec

    dataset = load_dataset(spec.path, spec.split)
    folder = store.join(out, model.name, spec.name)
    settings = {"top_k": config.top_k, "split": spec.split}
    if not model.is_bm25:
        settings.update(index_type=config.index_type, shards=config.shards,
                        embedding_dtype=config.embedding_dtype)
    model_hash = "bm25" if model.is_bm25 else resolve_model(model.model).fingerprint()
    data_hash = dataset_fingerprint(dataset.files)
    key = run_key(model, model_hash, data_hash, settings)
    stored = finished(folder, key)
    if stored is not None:
        return RunRecord(model.name, spec.name, folder, key, True, stored)

    started = time.time()
    queries = dataset.judged_queries()
    throughput, artefacts = {}, {}
    if model.is_bm25:
        hits_by_query = ray.get(ray.remote(num_cpus=0.5)(_bm25_task).remote(
            spec.path, spec.split, config.top_k))
        run = hits_by_query
    else:
        emb_folder = store.join(root, "embeddings", f"{spec.name}-{data_hash}",
                                f"{model.name}-{model_hash}")
        encoded = encode(EncodeConfig(corpus=spec.path, model=model.model, out=emb_folder,
                                      embedding_dtype=config.embedding_dtype,
                                      **{k: v for k, v in model.encoder_options().items()
                                         if k in ("prompt", "pooling", "passage_prefix",
                                                  "passage_max_length", "dtype",
                                                  "normalize")}))
        if encoded.docs:
            throughput = {"docs": encoded.docs, "docs_per_s": encoded.docs_per_s,
                          "tokens_per_s": encoded.tokens_per_s,
                          "padding_fraction": encoded.padding_fraction}
        index_folder = store.join(root, "indexes", f"{spec.name}-{data_hash}",
                                  f"{model.name}-{model_hash}",
                                  f"{config.index_type}-{config.shards}")
        index(IndexConfig(embeddings=emb_folder, out=index_folder, shards=config.shards,
                          type=config.index_type))
        hits = ray.get(ray.remote(num_cpus=0.5)(_search_task).remote(
            index_folder, model.model, model.encoder_options(), list(queries.values()),
            config.top_k))
        run = dict(zip(queries, hits))
        artefacts = {"embeddings": emb_folder, "index": index_folder}
    result = score_run(dataset, run)
    result.update({"dataset": spec.name, "model": model.name, "split": spec.split,
                   "settings": settings, "seconds": time.time() - started})
    write_trec(run, store.join(folder, "run.trec"), tag=model.name)
    store.write_json(store.join(folder, "metrics.json"), result)
    store.write_json(store.join(folder, "provenance.json"), {
        "key": key, "model": model.model, "model_options": model.encoder_options(),
        "model_hash": model_hash, "dataset": spec.path, "dataset_hash": data_hash,
        "dataset_files": dataset.files, "settings": settings, "throughput": throughput,
        **artefacts, "code_version": code_version(), "created": now()})
    return RunRecord(model.name, spec.name, folder, key, False, result)


def write_report(config: MatrixConfig, records: list[RunRecord], out: str) -> str:
    from retriever.io.formats import load_dataset
    from retriever.evaluation.metrics import per_query
    from retriever.index.ranking import read_trec
    from retriever.evaluation.report import (Cell, bar_chart_png, html_report, markdown_table,
                                  throughput_table)

    specs = {DatasetSpec.parse(d).name: DatasetSpec.parse(d) for d in config.datasets}
    models = [ModelSpec.parse(m).name for m in config.models]
    results: dict = {}
    for record in records:
        spec = specs[record.dataset]
        qrels = load_dataset(spec.path, spec.split).qrels
        scores = per_query(qrels, read_trec(store.join(record.folder, "run.trec")))["ndcg@10"]
        results.setdefault(record.dataset, {})[record.model] = Cell(record.metrics["ndcg@10"],
                                                                   scores)
    baseline = config.baseline if config.baseline in models else None
    tables = [("NDCG@10", markdown_table(results, models, "ndcg@10", baseline))]
    for metric in ("mrr@10", "recall@100"):
        other = {ds: {m: Cell(next(r.metrics[metric] for r in records
                                   if r.dataset == ds and r.model == m)) for m in row}
                 for ds, row in results.items()}
        tables.append(({"mrr@10": "MRR@10", "recall@100": "Recall@100"}[metric],
                       markdown_table(other, models, metric)))
    rows = []
    for record in records:
        provenance = store.read_json(store.join(record.folder, "provenance.json"))
        if provenance.get("throughput"):
            rows.append({"model": record.model, "dataset": record.dataset,
                         **provenance["throughput"]})
    tables.append(("Encoding throughput", throughput_table(rows, config.price_per_hour,
                                                           config.hardware)))
    png = bar_chart_png(results, models, "ndcg@10")
    markdown = "\n\n".join(f"## {title}\n\n{table}" for title, table in tables)
    store.write_text(store.join(out, "report.md"),
                     f"# Evaluation matrix {config.matrix_id}\n\n{markdown}\n\n"
                     "![NDCG@10 per dataset](ndcg.png)\n")
    store.write_bytes(store.join(out, "ndcg.png"), png)
    store.write_text(store.join(out, "report.html"),
                     html_report(f"Evaluation matrix {config.matrix_id}", tables,
                                 [("NDCG@10 per dataset and model", png)]))
    return markdown


def run(config: MatrixConfig) -> tuple[list[RunRecord], str]:
    import ray

    models = [ModelSpec.parse(m) for m in config.models]
    datasets = [DatasetSpec.parse(d) for d in config.datasets]
    root = store.default_root()
    out = config.out or store.join(root, "evals", config.matrix_id)
    out = out if store.has_scheme(out) else os.path.abspath(out)
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    records = []
    total = len(models) * len(datasets)
    for spec in datasets:
        for model in models:
            record = run_cell(config, model, spec, root, out)
            records.append(record)
            state = "reused" if record.reused else "computed"
            print(f"[{len(records)}/{total}] {model.name} on {spec.name}: ndcg@10 "
                  f"{record.metrics['ndcg@10']:.4f} ({state})", flush=True)
    return records, write_report(config, records, out)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(MatrixConfig, argv, prog="retriever evaluate")
    records, markdown = run(config)
    print()
    print(markdown)
    out = os.path.dirname(records[0].folder.rstrip("/")).rsplit("/", 1)[0] if records else ""
    print(f"\nreport: {out}/report.md, report.html, ndcg.png; "
          f"{sum(r.reused for r in records)} of {len(records)} runs reused")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["evaluate", *sys.argv[1:]]))
