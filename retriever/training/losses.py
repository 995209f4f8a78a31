"""Contrastive loss for dense retrieval.

InfoNCE (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive
Coding"), as used for DPR (Karpukhin et al. 2020) and RepLLaMA (Ma et al. 2023): each query is
scored against every passage in the batch: its own positive, its hard negatives, and all other
queries' positives and negatives (in-batch negatives). With ``gather=True`` passages from every
worker join the candidate set through an autograd-aware all_gather, so the number of negatives
grows with the number of workers while gradients still flow to the local encoder.

When a query appears more than once in a batch (one item per (query, positive) pair), its other
positives would count as negatives; ``query_keys`` (an integer id per query) masks them out of
the candidate set, as Tevatron and sentence-transformers' CachedMNRL do for duplicates.

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


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Concatenate an integer tensor from all ranks (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    out = [torch.zeros_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(out, keys.contiguous())
    return torch.cat(out, dim=0)


def info_nce(queries: torch.Tensor, passages: torch.Tensor, temperature: float = 0.01,
             group_size: int | None = None, gather: bool = False,
             query_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each query's positive against all candidates.

    ``queries``: [B, d]; ``passages``: [B * group_size, d]. Vectors are compared by dot
    product, which is cosine similarity when they are L2-normalised (the Encoder's default).
    ``query_keys``: [B] integer ids; another group's positive whose query has the same id is
    not a negative and is left out.
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
    scores = (queries @ passages.T / temperature).float()
    targets = (torch.arange(n_queries, device=queries.device) + offset) * group_size
    if query_keys is not None:
        all_keys = gather_keys(query_keys) if gather else query_keys
        slot_keys = all_keys.repeat_interleave(group_size)  # the query id of every candidate
        is_positive = torch.arange(passages.size(0), device=queries.device) % group_size == 0
        same_query = query_keys[:, None] == slot_keys[None, :]
        mask = same_query & is_positive[None, :]
        mask[torch.arange(n_queries), targets] = False
        scores = scores.masked_fill(mask, float("-inf"))
    return F.cross_entropy(scores, targets)


def matryoshka_dims(dims: list[int] | None, full: int) -> list[int]:
    """The nested prefix sizes a Matryoshka loss sums over: ``dims`` then the full size
    (once), each at most ``full``; ``[full]`` without ``dims``."""
    dims = list(dims or [])
    if any(d > full for d in dims):
        raise ValueError(f"matryoshka_dims {dims}: larger than the embedding size {full}")
    return dims + ([full] if not dims or dims[-1] != full else [])


def contrastive_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float,
                     group_size: int | None = None, gather: bool = False,
                     query_keys: torch.Tensor | None = None, dims: list[int] | None = None,
                     weights: list[float] | None = None) -> torch.Tensor:
    """InfoNCE on the full vectors, or, with ``dims``, the Matryoshka loss (Kusupati et al.
    2022, "Matryoshka Representation Learning"): the weighted sum of InfoNCE over the nested
    prefixes ``dims`` + the full vector, each prefix L2-normalised again (as the Encoder's
    ``dims=`` truncates). ``weights``: one per prefix incl. the full one (default all 1)."""
    nested = matryoshka_dims(dims, queries.size(-1))
    weights = list(weights) if weights else [1.0] * len(nested)
    if len(weights) != len(nested):
        raise ValueError(f"matryoshka_weights {weights}: expected {len(nested)} (one per "
                         f"dimension {nested})")
    total = None
    for dim, weight in zip(nested, weights):
        q, p = queries, passages
        if dim < queries.size(-1):
            q = F.normalize(queries[:, :dim], dim=-1)
            p = F.normalize(passages[:, :dim], dim=-1)
        term = weight * info_nce(q, p, temperature, group_size, gather, query_keys)
        total = term if total is None else total + term
    return total
