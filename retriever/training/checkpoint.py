"""Training checkpoints: safetensors and JSON only, independent of the number of workers.

A checkpoint directory (one per saved step, managed by Ray Train in the run folder) holds::

    adapter_config.json, adapter_model.safetensors, retriever.json   the LoRA weights (fp32,
                                                      gathered): a loadable adapter in itself
    optimizer.safetensors     Adam moments per parameter: "<param name>.exp_avg" / ".exp_avg_sq"
                              (gathered from the DeepSpeed ZeRO partitions)
    trainer_state.json        step, epoch, plan, the settings hash, loss history, restarts

The optimizer state is DeepSpeed's (or DDP's) state in a rank-independent form, so a run can
resume with another worker count or strategy; DeepSpeed's own checkpoint format (per-rank
pickles) is not used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def write_state(directory: str | Path, optimizer_state: dict[str, torch.Tensor],
                state: dict) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer_state:
        save_file({k: v.contiguous() for k, v in optimizer_state.items()},
                  str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(trainer state, optimizer tensors)``; a missing optimizer file means no step yet."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state_file = directory / STATE_FILE
    if not state_file.exists():
        raise ValueError(f"checkpoint {directory} has no {STATE_FILE}")
    state = json.loads(state_file.read_text())
    optimizer = directory / OPTIMIZER_FILE
    return state, (load_file(str(optimizer)) if optimizer.exists() else {})
