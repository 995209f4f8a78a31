"""The trainable embedder: a Hugging Face backbone with LoRA, pooled like the Encoder.

:func:`build_backbone` loads the backbone, under transformers' ``HfDeepSpeedConfig`` for
ZeRO-3 so that ``from_pretrained`` partitions every weight as it is loaded (no worker ever
holds the full model); LoRA is applied afterwards (its new weights are partitioned by
``deepspeed.initialize``). :class:`EmbeddingModel` embeds queries and passages in one forward
call, which both DeepSpeed and DDP then see as one module invocation per micro-step.
"""

from __future__ import annotations

import torch

from retriever.modeling.registry import ResolvedModel
from retriever.modeling.pooling import embed


class EmbeddingModel(torch.nn.Module):
    """``forward(ids, mask, ids, mask, ...) -> (vectors, vectors, ...)``: one embedding per
    (token ids, attention mask) pair, e.g. ``(q_ids, q_mask, p_ids, p_mask)`` -> queries and
    passages in one call, or one chunk of texts (GradCache) as ``(ids, mask)``."""

    def __init__(self, backbone: torch.nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.backbone = backbone
        self.pooling = "last" if pooling == "eos" else pooling
        self.normalize = normalize

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, input_ids, attention_mask, self.pooling, self.normalize)

    def forward(self, *pairs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not pairs or len(pairs) % 2:
            raise ValueError(f"expected (input_ids, attention_mask) pairs, got {len(pairs)} "
                             "tensors")
        return tuple(self.embed(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))


class Backbone:
    """The loaded backbone plus the ``HfDeepSpeedConfig`` that must outlive it under ZeRO-3."""

    def __init__(self, model: torch.nn.Module, hf_deepspeed_config=None):
        self.model = model
        self.hf_deepspeed_config = hf_deepspeed_config

    def release(self) -> None:
        """Forget the global DeepSpeed config so later ``from_pretrained`` calls load normally."""
        if self.hf_deepspeed_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self.hf_deepspeed_config = None


def build_backbone(resolved: ResolvedModel, dtype: torch.dtype, ds_config: dict | None = None,
                   gradient_checkpointing: bool = False) -> Backbone:
    """Load ``resolved`` for training; partitioned on load when ``ds_config`` is ZeRO-3."""
    from transformers import AutoModel

    hf_ds = None
    if ds_config and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_config)  # must exist before from_pretrained
    model = AutoModel.from_pretrained(resolved.path, dtype=dtype)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Backbone(model, hf_ds)


def hidden_size(resolved: ResolvedModel) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(resolved.path) / "config.json").read_text())
    size = config.get("hidden_size") or config.get("d_model") or config.get("n_embd")
    if not size and isinstance(config.get("text_config"), dict):
        size = config["text_config"].get("hidden_size")
    if not size:
        raise ValueError(f"{resolved.path}/config.json names no hidden size")
    return int(size)
