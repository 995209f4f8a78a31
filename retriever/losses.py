"""Contrastive loss for dense retrieval.

InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"), as used for DPR (Karpukhin et al. 2020) and RepLLaMA (Ma et al. 2023): each query is
scored against every passage in the batch: its own positive, its hard negatives, and all other
queries' positives and negatives (in-batch negatives). With ``gather=True`` passages from every
worker join the candidate set through an autograd-aware all_gather, so the number of negatives
grows with the number of workers while gradients still flow to the local encoder.

Layout: ``passages`` holds ``group_size`` rows per query, the positive first, then
``group_size - 1`` hard negatives; the target for query ``i`` is row ``i * group_size``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks; gradients flow back to each rank's own slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float = 0.01,
             group_size: int | None = None, gather: bool = False) -> torch.Tensor:
    """Mean cross-entropy of each query's positive against all candidates.

    ``queries``: [B, d]; ``passages``: [B * group_size, d]. Vectors are compared by dot
    product, which is cosine similarity when they are L2-normalised (the Encoder's default).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n_queries = queries.size(0)
    if group_size is None:
        if passages.size(0) % n_queries:
            raise ValueError(f"{passages.size(0)} passages do not divide into groups for "
                             f"{n_queries} queries")
        group_size = passages.size(0) // n_queries
    if passages.size(0) != n_queries * group_size:
        raise ValueError(f"expected {n_queries * group_size} passages ({n_queries} queries x "
                         f"group {group_size}), got {passages.size(0)}")
    offset = 0
    if gather:
        # Local queries against every worker's passages. With autograd all_gather plus DDP's
        # gradient averaging this is exactly the gradient of the mean loss over all workers.
        passages = gather_with_grad(passages)
        if dist.is_available() and dist.is_initialized():
            offset = dist.get_rank() * n_queries  # every rank has the same batch size
    scores = queries @ passages.T / temperature
    targets = (torch.arange(n_queries, device=queries.device) + offset) * group_size
    return F.cross_entropy(scores.float(), targets)
