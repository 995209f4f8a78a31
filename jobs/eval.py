"""Evaluate one model on one dataset: ``retriever eval --dataset PATH_OR_URL --model M``.

``M`` is ``bm25``, a packaged model name (``minilm``, ``smollm2-135m``, ...), or a model /
adapter directory. Writes ``metrics.json`` and ``run.trec`` under ``--out`` (default
``<store>/evals/adhoc/<model>/<dataset>-<split>``) and prints the metrics table.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.io import store
from retriever.io.formats import load_dataset
from retriever.evaluation.metrics import METRICS


@dataclass
class EvalConfig:
    """Evaluate a model (or BM25) on a BEIR / MS MARCO folder."""

    dataset: str = field(metadata={"help": "dataset folder: local path or fsspec URL"})
    model: str = field(default="minilm", metadata={"help": "bm25, a packaged name or a path"})
    split: str = field(default="test", metadata={"help": "qrels split"})
    out: str | None = field(default=None, metadata={"help": "output URL (folder)"})
    top_k: int = field(default=1000, metadata={"help": "hits kept per query"})
    prompt: str = field(default="none", metadata={"help": "none | one-word (zero-shot LLM)",
                                                  "choices": ["none", "one-word"]})
    pooling: str | None = field(default=None, metadata={"help": "mean | cls | last"})
    query_prefix: str | None = None
    passage_prefix: str | None = None
    instruction: str | None = field(default=None, metadata={"help": "query task instruction"})
    query_max_length: int | None = None
    passage_max_length: int | None = None
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device: str = "auto"
    batch_size: int = 64
    ignore_identical_ids: bool = field(default=False,
                                       metadata={"help": "drop hits whose doc id = query id"})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").rsplit("/", 1)[-1]) or "model"


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table: one row per system, one column per metric."""
    names = list(METRICS)
    width = max([len("system")] + [len(r) for r in rows])
    lines = [title] if title else []
    lines.append(f"{'system':<{width}}  " + "  ".join(f"{n:>11}" for n in names))
    for system, values in rows.items():
        lines.append(f"{system:<{width}}  " + "  ".join(f"{values[n]:>11.4f}" for n in names))
    return "\n".join(lines)


def run(config: EvalConfig) -> dict:
    """Retrieve, score, write ``metrics.json`` and ``run.trec``; returns the metrics."""
    from retriever.evaluation.runs import bm25_run, dense_run, score_run
    from retriever.index.ranking import write_trec

    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "evals", "adhoc", _slug(config.model),
                                   f"{dataset.name}-{config.split}")
    started = time.time()
    if config.model == "bm25":
        run_, timing = bm25_run(dataset, config.top_k)
        settings = {"model": "bm25", "k1": 0.9, "b": 0.4, "stemmer": "english",
                    "stopwords": "en"}
    else:
        from retriever.modeling.encoder import Encoder, EncoderConfig

        encoder_fields = {f.name for f in dataclasses.fields(EncoderConfig)}
        encoder = Encoder(EncoderConfig(**{k: v for k, v in dataclasses.asdict(config).items()
                                           if k in encoder_fields}))
        run_, timing = dense_run(encoder, dataset, config.top_k)
        settings = encoder.settings()
    result = score_run(dataset, run_, config.ignore_identical_ids)
    result.update({"dataset": dataset.name, "dataset_source": config.dataset,
                   "split": config.split, "top_k": config.top_k,
                   "ignore_identical_ids": config.ignore_identical_ids,
                   "settings": settings, "timing": {**timing, "total_s": time.time() - started}})
    write_trec(run_, store.join(out, "run.trec"), tag=_slug(config.model))
    store.write_json(store.join(out, "metrics.json"), result)
    result["out"] = out
    return result


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(EvalConfig, argv, prog="retriever eval")
    result = run(config)
    print(format_table({config.model: result},
                       f"{result['dataset']} ({config.split}): {result['counts']['queries']} "
                       f"queries, {result['counts']['docs']} docs"))
    print(f"wrote {result['out']}/metrics.json and run.trec")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["eval", *sys.argv[1:]]))
