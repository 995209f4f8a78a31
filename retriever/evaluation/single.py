"""Evaluate one model (or BM25, or a hybrid) on one dataset: :class:`EvalConfig` in, metrics out.

:func:`evaluate` retrieves the top ``top_k`` documents per judged query (BM25, the
:class:`~retriever.modeling.encoder.Encoder` with exact search, or a hybrid ``bm25+<model>``:
both, fused by ``retriever.index.fusion`` with ``--fusion rrf|weighted``), scores the run and writes
``metrics.json`` and ``run.trec`` under ``out`` (default
``<store>/evals/adhoc/<model>/<dataset>-<split>``); :func:`format_table` prints metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from retriever.config import flat
from retriever.evaluation.metrics import METRICS
from retriever.index.fusion import METHODS, FusionConfig, hybrid_dense_model
from retriever.io import store
from retriever.io.formats import Dataset, load_dataset
from retriever.modeling.encoder import EncoderConfig

BM25 = "bm25"  # the model name that means BM25
BM25_SETTINGS = {"model": BM25, "k1": 0.9, "b": 0.4, "stemmer": "english", "stopwords": "en"}


@dataclass
class EvalConfig:
    """Evaluate a model (or BM25: ``--model bm25``, or a hybrid: ``--model bm25+minilm``) on a
    BEIR / MS MARCO folder."""

    dataset: str = field(metadata={"help": "dataset folder: local path or fsspec URL"})
    split: str = field(default="test", metadata={"help": "qrels split"})
    out: str | None = field(default=None, metadata={"help": "output URL (folder)"})
    top_k: int = field(default=1000, metadata={"help": "hits kept per query"})
    ignore_identical_ids: bool = field(default=False,
                                       metadata={"help": "drop hits whose doc id = query id"})
    fusion: str = field(default="rrf", metadata={
        "help": "hybrid (bm25+<model>): how the two rankings are fused", "choices": list(METHODS)})
    rrf_k: int = field(default=60, metadata={"help": "hybrid, rrf: the k in 1 / (k + rank)"})
    hybrid_weight: float = field(default=0.5, metadata={
        "help": "hybrid, weighted: the dense ranking's weight (BM25 gets 1 - weight)"})
    encoder: EncoderConfig = flat(EncoderConfig)  # its model may be "bm25" or "bm25+<model>"

    @property
    def model(self) -> str:
        return self.encoder.model

    def fusion_config(self) -> FusionConfig:
        return FusionConfig(self.fusion, self.rrf_k, self.hybrid_weight)


def _retrieve(config: EvalConfig, dataset: Dataset) -> tuple[dict, dict, dict]:
    """(run, timing, settings) from BM25, the configured Encoder or both fused."""
    from dataclasses import replace

    from retriever.evaluation.retrieval import bm25_run, dense_run, hybrid_run

    if config.model == BM25:
        run, timing = bm25_run(dataset, config.top_k)
        return run, timing, dict(BM25_SETTINGS)
    from retriever.modeling.encoder import Encoder

    dense_model = hybrid_dense_model(config.model)
    if dense_model is None:
        encoder = Encoder(config.encoder)
        run, timing = dense_run(encoder, dataset, config.top_k)
        return run, timing, encoder.settings()
    fusion = config.fusion_config()
    encoder = Encoder(replace(config.encoder, model=dense_model))
    run, timing = hybrid_run(encoder, dataset, config.top_k, fusion)
    return run, timing, {"model": config.model, **fusion.settings(),
                         "sparse": dict(BM25_SETTINGS), "dense": encoder.settings()}


def evaluate(config: EvalConfig) -> dict:
    """Retrieve, score, write ``metrics.json`` and ``run.trec``; returns the metrics with the
    output folder under ``out``."""
    from retriever.evaluation.retrieval import score_run
    from retriever.index.ranking import write_trec

    if hybrid_dense_model(config.model) is not None:
        config.fusion_config()  # refuse bad fusion settings before any work
    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "evals", "adhoc",
                                   store.slug(config.model, "model"),
                                   f"{dataset.name}-{config.split}")
    started = time.time()
    run, timing, settings = _retrieve(config, dataset)
    result = score_run(dataset, run, config.ignore_identical_ids)
    result.update({"dataset": dataset.name, "dataset_source": config.dataset,
                   "split": config.split, "top_k": config.top_k,
                   "ignore_identical_ids": config.ignore_identical_ids,
                   "settings": settings, "timing": {**timing, "total_s": time.time() - started}})
    write_trec(run, store.join(out, "run.trec"), tag=store.slug(config.model, "model"))
    store.write_json(store.join(out, "metrics.json"), result)
    result["out"] = out
    return result


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: one row per system, one column per metric."""
    names = list(METRICS)
    width = max([len("system")] + [len(r) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'system':<{width}}  " + "  ".join(f"{n:>11}" for n in names))
    for system, values in rows.items():
        lines.append(f"{system:<{width}}  " + "  ".join(f"{values[n]:>11.4f}" for n in names))
    return "\n".join(lines)
