"""The README's main job on the embedded default: local store, packaged models, a real
collection. Today: zero-shot MiniLM against BM25 on Cranfield, printed as a metrics table.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from retriever import config as cfg
from retriever import store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@dataclass
class DemoConfig:
    """Zero-shot MiniLM vs BM25 on a BEIR collection (Cranfield by default)."""

    dataset: str = field(default=str(SHARED_DATASETS / "cranfield"),
                         metadata={"help": "BEIR folder (local path or fsspec URL)"})
    models: list = field(default_factory=lambda: ["bm25", "minilm"],
                         metadata={"help": "systems to compare"})
    store: str | None = field(default=None, metadata={"help": "store root (default ./.retriever)"})


def main(argv: list[str] | None = None) -> int:
    from jobs.eval import EvalConfig, format_table, run

    config = cfg.parse(DemoConfig, argv, prog="retriever demo")
    if not store.has_scheme(config.dataset) and not os.path.isdir(config.dataset):
        print(f"retriever demo: dataset folder {config.dataset} not found.\n"
              "Point it at a BEIR folder (corpus.jsonl[.gz], queries.jsonl[.gz], "
              "qrels/test.tsv):\n  retriever demo --dataset /path/to/beir/cranfield",
              file=sys.stderr)
        return 2
    root = config.store or store.default_root()
    name = config.dataset.rstrip("/").rsplit("/", 1)[-1]
    rows = {}
    for index, model in enumerate(config.models, start=1):
        print(f"[{index}/{len(config.models)}] evaluating {model} on {name} ...", flush=True)
        out = store.join(root, "evals", "demo", model, name)
        result = run(EvalConfig(dataset=config.dataset, model=model, out=out))
        rows[model] = result
        print(f"      ndcg@10 {result['ndcg@10']:.4f}  -> {out}", flush=True)
    counts = next(iter(rows.values()))["counts"]
    print()
    print(format_table(rows, f"{name} (test): {counts['queries']} queries, "
                             f"{counts['docs']} docs"))
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["demo", *sys.argv[1:]]))
