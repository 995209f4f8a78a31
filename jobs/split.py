"""Split a collection's judged queries deterministically: ``retriever split --dataset PATH``.

Writes a BEIR folder (corpus, ``queries_<split>.jsonl``, ``qrels/<split>.tsv``, manifest) under
``--out`` (default ``<store>/datasets/<name>-split-s<seed>``), so that
``retriever mine --dataset OUT --split train`` and ``retriever eval --dataset OUT`` (the held-out
``test`` queries) work unchanged. See ``retriever.io.splits`` for the rule; the work is
``retriever.pipelines.split``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.pipelines.split import SplitConfig, split_dataset


def run(config: SplitConfig) -> dict:
    """Split (see :func:`retriever.pipelines.split.split_dataset`); returns the manifest."""
    return split_dataset(config)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(SplitConfig, argv, prog="retriever split")
    manifest = run(config)
    sizes = ", ".join(f"{name} {c['queries']}" for name, c in manifest["counts"].items())
    print(f"split {config.dataset} ({manifest['docs']} docs): {sizes} queries")
    print(f"wrote {manifest['out']}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["split", *sys.argv[1:]]))
