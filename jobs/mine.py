"""Mine hard negatives for training: ``retriever mine --dataset PATH --split train``.

BM25 and dense candidates per judged query, positives excluded, false negatives filtered,
fused, sampled from a rank window (see ``retriever.training.mining``). Writes ``examples.parquet``
(the training-example format of ``retriever.io.formats``) and ``manifest.json`` (last) under
``--out`` (default ``<store>/mined/<dataset>-<split>-<dense model>``); ``retriever train
--train-data`` takes that folder. The dense model: ``--dense-model`` (``none``: BM25 only),
``--dense-batch-size``, ``--dense-dtype``, ``--dense-query-dtype``. The work is
``retriever.pipelines.mine``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.pipelines.mine import EXAMPLES_FILE, MineConfig, mine_split


def run(config: MineConfig) -> dict:
    """Mine (see :func:`retriever.pipelines.mine.mine_split`); returns the manifest."""
    return mine_split(config)


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
