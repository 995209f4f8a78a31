"""The README's main job on the embedded default: ``retriever demo`` (``make demo``).

Split, mine, fine-tune, evaluate and serve on Cranfield, each stage one of the project's jobs;
the stages are ``retriever.pipelines.demo``. This module parses the flags and hands the
pipeline the Serve app (the library does not import ``serve``). Every stage
writes to the store and is reused (or resumed) on a second run; the run ends with the NDCG@10
table (paired t-test against zero-shot MiniLM). ``--verbose`` shows Ray's own logs too.
"""

from __future__ import annotations

import os
import sys

from retriever import config as cfg
from retriever.io import store
from retriever.pipelines.demo import DemoConfig, Serving, StageFailed, run_demo, training_config

__all__ = ["DemoConfig", "main", "serving", "training_config"]


def serving() -> Serving:
    """The Serve app (``serve/launch.py``), which the library may not import."""
    from serve import launch

    return Serving(start=lambda **kw: launch.start(launch.ServeConfig(**kw)),
                   until_stopped=launch.serve_until_stopped)


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(DemoConfig, argv, prog="retriever demo")
    if not store.has_scheme(config.dataset) and not os.path.isdir(config.dataset):
        print(f"retriever demo: dataset folder {config.dataset} not found.\n"
              "Point it at a BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], "
              "qrels/test.tsv):\n  retriever demo --dataset /path/to/beir/cranfield",
              file=sys.stderr)
        return 2
    try:
        run_demo(config, serving())
    except StageFailed as err:
        print(f"retriever demo: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["demo", *sys.argv[1:]]))
