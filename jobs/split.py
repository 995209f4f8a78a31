"""Split a collection's judged queries deterministically: ``retriever split --dataset PATH``.

Writes a BEIR folder (corpus, ``queries_<split>.jsonl``, ``qrels/<split>.tsv``, manifest) under
``--out`` (default ``<store>/datasets/<name>-split-s<seed>``), so that
``retriever mine --dataset OUT --split train`` and ``retriever eval --dataset OUT`` (the held-out
``test`` queries) work unchanged. See ``retriever.io.splits`` for the rule.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from retriever import config as cfg
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


def run(config: SplitConfig) -> dict:
    dataset = load_dataset(config.dataset, config.split)
    out = config.out or store.join(store.default_root(), "datasets",
                                   f"{dataset.name}-split-s{config.seed}")
    splits = split_queries(dataset, config.test_fraction, config.seed, config.dev_fraction)
    manifest = write_split(splits, out, cfg.to_dict(config))
    manifest["out"] = out
    return manifest


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(SplitConfig, argv, prog="retriever split")
    if not 0 < config.test_fraction < 1:
        raise SystemExit(f"retriever split: --test-fraction must be in (0, 1), got "
                         f"{config.test_fraction}")
    manifest = run(config)
    sizes = ", ".join(f"{name} {c['queries']}" for name, c in manifest["counts"].items())
    print(f"split {config.dataset} ({manifest['docs']} docs): {sizes} queries")
    print(f"wrote {manifest['out']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["split", *sys.argv[1:]]))
