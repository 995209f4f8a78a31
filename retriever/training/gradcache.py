"""GradCache: the gradients of a large contrastive batch with the memory of a small chunk.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
The contrastive loss couples every query with every passage, so a batch cannot simply be split
into accumulation steps. GradCache splits the *encoder* instead:

1. embed every chunk of ``chunk`` texts without an autograd graph (queries and passages
   separately), saving the RNG state before each chunk;
2. compute the loss on the whole batch's embeddings (in-batch, hard and cross-worker
   negatives: ``loss_fn`` may all_gather) and its gradient with respect to every embedding;
3. embed each chunk again, with a graph, from its saved RNG state (the same dropout masks),
   and back-propagate ``<embeddings, cached gradient>`` through the encoder.

The result is the gradient of the same loss as one forward over the same chunks would give;
activation memory is that of one chunk. Inputs are the tokenized batches (``input_ids`` and
``attention_mask``, padded once for the whole batch, so chunks see the same padding) and an
:class:`retriever.training.engines.Engine`; every chunk's backward runs inside
``engine.accumulate(last and final chunk)`` so DDP synchronises and DeepSpeed reduces once.
"""

from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def chunk_slices(size: int, chunk: int) -> list[slice]:
    """``[0:chunk], [chunk:2 chunk], ...`` covering ``size`` rows."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [slice(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def rng_state(device: torch.device) -> tuple:
    """The CPU generator's state, and the CUDA one of ``device`` when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Go back to ``state`` (so dropout draws the masks it drew then)."""
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _pieces(batch: dict, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(batch["input_ids"][s], batch["attention_mask"][s])
            for s in chunk_slices(batch["input_ids"].size(0), chunk)]


def _embed_without_graph(engine, pieces, device) -> tuple[torch.Tensor, list[tuple]]:
    states, vectors = [], []
    with torch.no_grad():
        for ids, mask in pieces:
            states.append(rng_state(device))
            vectors.append(engine(ids, mask)[0])
    return torch.cat(vectors).detach(), states


def cached_backward(engine, queries: dict, passages: dict, loss_fn: LossFn, chunk: int,
                    last_micro_step: bool, device: torch.device) -> torch.Tensor:
    """One micro-step's loss and backward with GradCache; returns the loss (detached)."""
    jobs = [_pieces(queries, chunk), _pieces(passages, chunk)]
    embedded = [_embed_without_graph(engine, pieces, device) for pieces in jobs]
    leaves = [vectors.requires_grad_() for vectors, _ in embedded]
    with torch.enable_grad():
        loss = loss_fn(*leaves)
        loss.backward()  # only the leaves and the gathered copies: no model parameter here
    after = rng_state(device)
    todo = [(pieces[i], states[i], leaf.grad[s])
            for pieces, (_, states), leaf in zip(jobs, embedded, leaves)
            for i, s in enumerate(chunk_slices(leaf.size(0), chunk))]
    for k, ((ids, mask), state, grad) in enumerate(todo):
        set_rng_state(state, device)
        with engine.accumulate(last_micro_step and k == len(todo) - 1):
            vectors = engine(ids, mask)[0]
            # d<v, g>/dθ = (dv/dθ)^T g: this chunk's share of d loss / dθ.
            engine.backward(torch.sum(vectors.float() * grad.to(vectors.device).float()))
    set_rng_state(after, device)  # the stream continues as after the first pass
    return loss.detach()


def chunked_backward(engine, queries: dict, passages: dict, loss_fn: LossFn, chunk: int,
                     last_micro_step: bool) -> torch.Tensor:
    """The reference GradCache must equal: the same chunks embedded in the same order (the
    same dropout draws), all in one forward call and one graph, and one backward of the loss.
    With ``chunk`` >= the batch it is the training loop's plain step."""
    q_pieces, p_pieces = _pieces(queries, chunk), _pieces(passages, chunk)
    with engine.accumulate(last_micro_step):
        vectors = engine(*[t for piece in q_pieces + p_pieces for t in piece])
        loss = loss_fn(torch.cat(vectors[:len(q_pieces)]), torch.cat(vectors[len(q_pieces):]))
        engine.backward(loss)
    return loss.detach()
