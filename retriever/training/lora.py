"""LoRA (Hu et al. 2021) on a retriever backbone with peft.

Default targets: every projection layer of a decoder LLM (attention q/k/v/o and the MLP's
gate/up/down, as RepLLaMA), and query/key/value/dense of a BERT-style encoder (the pooler's
dense layer is left out: the embedding never reads it, so it would get no gradient).
"""

from __future__ import annotations

import torch

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENCODER_TARGETS = ("query", "key", "value", "dense")
EXCLUDED = ("pooler.dense",)


def _linear_suffixes(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


def default_targets(model: torch.nn.Module) -> list[str]:
    """The projection layers LoRA adapts in ``model`` by default."""
    present = _linear_suffixes(model)
    for family in (DECODER_TARGETS, ENCODER_TARGETS):
        found = [name for name in family if name in present]
        if found:
            return found
    raise ValueError("cannot pick LoRA target modules for this architecture (linear layers: "
                     f"{', '.join(sorted(present)) or 'none'}); set lora_target_modules")


def lora_config(model: torch.nn.Module, r: int, alpha: int, dropout: float,
                targets: list[str] | None = None):
    from peft import LoraConfig

    targets = list(targets) if targets else default_targets(model)
    present = _linear_suffixes(model)
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in present]
    if missing:
        raise ValueError(f"LoRA target module(s) {', '.join(missing)} not found in the model "
                         f"(linear layers: {', '.join(sorted(present))})")
    exclude = [name for name in EXCLUDED
               if any(n.endswith(name) for n, _ in model.named_modules())]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      exclude_modules=exclude or None, bias="none")


def apply_lora(model: torch.nn.Module, config, seed: int):
    """Wrap ``model`` with fresh LoRA weights, seeded so every worker and strategy starts from
    the same adapter (lora_B is zero, so the wrapped model starts equal to the base)."""
    from peft import get_peft_model

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(state)
