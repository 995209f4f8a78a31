"""Pooling token states into one vector: mean, cls (first real token) or last (final real token).

Both find real tokens through the attention mask, so they are correct under left padding
(decoder batches) and right padding (encoder batches) alike.
"""

from __future__ import annotations

import torch

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``hidden``: [batch, seq, dim]; ``attention_mask``: [batch, seq] of 0/1."""
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if mode == "cls":
        first = attention_mask.int().argmax(dim=1)
        return hidden[rows, first]
    if mode in ("last", "eos"):
        seq_len = attention_mask.size(1)
        last = seq_len - 1 - attention_mask.int().flip(dims=[1]).argmax(dim=1)
        return hidden[rows, last]
    raise ValueError(f"pooling {mode!r}: expected one of {', '.join(POOLINGS)}")


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
          mode: str, normalize: bool) -> torch.Tensor:
    """One embedding (float32, L2-normalised if ``normalize``) per row: ``model``'s last hidden
    states pooled by ``mode``; with autograd, so the Encoder and training share it."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    vectors = pool(out.last_hidden_state, attention_mask, mode).float()
    return torch.nn.functional.normalize(vectors, p=2, dim=-1) if normalize else vectors
