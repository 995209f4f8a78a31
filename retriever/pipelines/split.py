"""Split a collection's judged queries into a new BEIR folder: :class:`SplitConfig` in, the
split's manifest out (:func:`split_dataset`).

The folder (corpus, ``queries_<split>.jsonl``, ``qrels/<split>.tsv``, manifest) goes under
``out`` (default ``<store>/datasets/<name>-split-s<seed>``); see :mod:`retriever.io.splits`
for the rule that assigns a query to train, dev or test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retriever.config import to_dict
from retriever.io import store
from retriever.io.formats import load_dataset
from retriever.io.splits import split_queries, write_split


@dataclass
class SplitConfig:
    """Split a test collection's queries into train / (dev) / test by a hash of their ids."""

    dataset: str = field(metadata={"help": "dataset folder: local path or fsspec URL"})
    split: str = field(default="test", metadata={"help": "qrels split of the source to divide"})
    test_fraction: float = field(default=1 / 3, metadata={"help": "share of queries held out"})
    dev_fraction: float = field(default=0.0, metadata={
        "help": "share carved out for tuning (from what is not test)"})
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "output folder URL"})

    def __post_init__(self):
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def split_dataset(config: SplitConfig) -> dict:
    """Split and write the folder; returns its manifest with ``out``."""
    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "datasets",
                                   f"{dataset.name}-split-s{config.seed}")
    splits = split_queries(dataset, config.test_fraction, config.seed, config.dev_fraction)
    manifest = write_split(splits, out, to_dict(config))
    manifest["out"] = out
    return manifest
