"""Mine a dataset split into a training-example folder: :class:`MineConfig` in, manifest out.

:func:`mine_split` runs :func:`retriever.training.mining.mine` on the split's judged queries and
writes ``examples.parquet`` (the training-example format of :mod:`retriever.io.formats`) and
``manifest.json`` (last) under ``out`` (default ``<store>/mined/<dataset>-<split>-<dense
model>``); ``retriever train --train-data`` takes that folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from retriever.config import flat
from retriever.errors import InputError
from retriever.io import store
from retriever.io.formats import load_dataset, write_training_examples
from retriever.training.mining import MiningConfig, mine

EXAMPLES_FILE = "examples.parquet"


@dataclass
class MineConfig:
    """Mine hard negatives (BM25 + dense) for a dataset split's judged queries."""

    dataset: str = field(metadata={"help": "dataset folder: local path or fsspec URL"})
    split: str = field(default="train", metadata={"help": "qrels split to mine for"})
    out: str | None = field(default=None, metadata={"help": "output folder URL"})
    mining: MiningConfig = flat(MiningConfig)


def mine_split(config: MineConfig) -> dict:
    """Mine, write the examples and the manifest; returns the manifest with ``out``."""
    started = time.time()
    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "mined",
                                   f"{dataset.name}-{config.split}-"
                                   f"{store.slug(config.mining.dense_model or 'bm25')}")
    examples, report = mine(dataset, config.mining)
    if not examples:
        raise InputError(f"{config.dataset} (split {config.split}): no query has a positive "
                         f"(grade >= {config.mining.min_relevance})")
    write_training_examples(examples, store.join(out, EXAMPLES_FILE))
    manifest = {"kind": "mined", "examples": EXAMPLES_FILE, "dataset": config.dataset,
                "dataset_name": dataset.name, "split": config.split, "files": dataset.files,
                "count": len(examples), **report, "seconds": time.time() - started}
    store.write_json(store.join(out, "manifest.json"), manifest)
    manifest["out"] = out
    return manifest
