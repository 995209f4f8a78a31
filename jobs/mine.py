"""Mine hard negatives for training: ``retriever mine --dataset PATH --split train``.

BM25 and dense candidates per judged query, positives excluded, false negatives filtered,
fused, sampled from a rank window (see ``retriever.training.mining``). Writes ``examples.parquet`` (the
training-example format of ``retriever.io.formats``) and ``manifest.json`` (last) under ``--out``
(default ``<store>/mined/<dataset>-<split>-<dense model>``); ``retriever train --train-data``
takes that folder.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from retriever import config as cfg
from retriever.io import store
from retriever.io.formats import load_dataset, write_training_examples
from retriever.training.mining import MiningConfig, mine

EXAMPLES_FILE = "examples.parquet"


@dataclass(kw_only=True)
class MineConfig(MiningConfig):
    """Mine hard negatives (BM25 + dense) for a dataset split's judged queries."""

    dataset: str = field(metadata={"help": "dataset folder: local path or fsspec URL"})
    split: str = field(default="train", metadata={"help": "qrels split to mine for"})
    out: str | None = field(default=None, metadata={"help": "output folder URL"})


def _slug(text: str | None) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text).rstrip("/").rsplit("/", 1)[-1]) or "x"


def run(config: MineConfig) -> dict:
    started = time.time()
    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "mined",
                                   f"{dataset.name}-{config.split}-"
                                   f"{_slug(config.dense_model or 'bm25')}")
    mining = MiningConfig(**{k: v for k, v in cfg.to_dict(config).items()
                             if k in MiningConfig.__dataclass_fields__})
    examples, report = mine(dataset, mining)
    if not examples:
        from retriever.errors import InputError

        raise InputError(f"{config.dataset} (split {config.split}): no query has a positive "
                         f"(grade >= {config.min_relevance})")
    write_training_examples(examples, store.join(out, EXAMPLES_FILE))
    manifest = {"kind": "mined", "examples": EXAMPLES_FILE, "dataset": config.dataset,
                "dataset_name": dataset.name, "split": config.split, "files": dataset.files,
                "count": len(examples), **report, "seconds": time.time() - started}
    store.write_json(store.join(out, "manifest.json"), manifest)
    manifest["out"] = out
    return manifest


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(MineConfig, argv, prog="retriever mine")
    manifest = run(config)
    s = manifest["stats"]
    print(f"mined {manifest['count']} examples from {config.dataset} ({config.split}): "
          f"{s['negatives'] / max(1, s['trained_queries']):.1f} negatives/query, "
          f"{s['filtered_bm25']} BM25 and {s['filtered_dense']} dense candidates filtered as "
          f"likely false negatives, {s['skipped_no_positive']} queries without a positive")
    print(f"wrote {manifest['out']}/{EXAMPLES_FILE} and manifest.json")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["mine", *sys.argv[1:]]))
