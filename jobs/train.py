"""Fine-tune a retriever: ``retriever train --config configs/train/minilm-cranfield.yaml``.

Ray Train ``TorchTrainer`` over ``--num-workers`` workers (GPUs when the cluster has them, else
CPU with gloo), DeepSpeed ZeRO-3 (``--strategy zero2`` / ``ddp`` selectable), peft LoRA,
InfoNCE with in-batch, hard and cross-worker negatives. Checkpoints, the exported ``adapter/``
and ``merged/`` model directories, ``metrics.jsonl`` and ``manifest.json`` go to the run folder
(``--out``, default ``<store>/runs/<run-id>/train``); running the same command again resumes
from the latest checkpoint. Submit to a cluster with ``retriever submit -- retriever train ...``.
"""

from __future__ import annotations

import sys

from retriever import config as cfg
from retriever.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    config = cfg.parse(TrainConfig, argv, prog="retriever train")
    from retriever.training.run import output_url, print_step, train

    print(f"training {config.model} ({config.strategy}, {config.num_workers} workers) -> "
          f"{output_url(config)}", flush=True)
    result = train(config, progress=print_step)
    if result.error:
        print(f"retriever train: failed: {result.error}", file=sys.stderr)
        return 1
    m = result.manifest or {}
    print(f"done: {m.get('steps', result.metrics.get('step'))} steps, final loss "
          f"{result.metrics.get('loss', float('nan')):.4f}"
          + (f", resumed from step(s) {[r['from_step'] for r in m['resumes']]}"
             if m.get("resumes") else ""))
    if m:
        print(f"adapter: {m['adapter']}")
        if m.get("merged"):
            print(f"merged:  {m['merged']}")
    print(f"run folder: {result.out}")
    return 0


if __name__ == "__main__":
    from jobs.cli import main as cli

    sys.exit(cli(["train", *sys.argv[1:]]))
