"""Deterministic, sharded training batches: what every worker trains on at every step.

Every worker reads the same training examples from the store and computes its own share: the
order of an epoch is a permutation seeded by ``(seed, epoch)``, optimizer step ``s`` takes the
next ``per_device x workers x accumulation`` items, and worker ``r`` takes its slice of each
micro-step. A query's group (its positive and ``group_size - 1`` negatives) is drawn with a
generator seeded by ``(seed, epoch, item)``. So the batch at any step is a pure function of the
step number: a run resumed from a checkpoint at step ``k`` continues with exactly the batches
an uninterrupted run would have seen, whatever the strategy, and every worker always has a full
batch (the collectives of ZeRO and the gathered negatives need every rank at every step).

Queries with fewer mined negatives than a group needs reuse them (sampling with replacement);
a query with none gets random negatives: other queries' positives.

Each query in a micro-batch carries a key (``MicroBatch.query_ids``) that the loss uses to
mask another group's positive of the *same* query. Examples without ``query_id`` (the usual
Tevatron / sentence-transformers layout) are keyed by their query text: an empty key shared by
every query would mask every in-batch negative and, with group size 1, make the loss 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from retriever.io.formats import TrainingExample
from retriever.errors import InputError


def query_key(example: TrainingExample) -> str:
    """What identifies the example's query: its id, else its text (never a shared empty key).
    The NUL keeps a text key from ever equalling a real id."""
    return example.query_id or f"\0text:{example.query}"


@dataclass(frozen=True)
class MicroBatch:
    queries: list[str]
    passages: list[str]  # group_size per query: positive first, then negatives
    query_ids: list[str]


class GroupSampler:
    def __init__(self, examples: list[TrainingExample], *, group_size: int, per_device: int,
                 world_size: int, accumulation: int = 1, seed: int = 0,
                 per_positive: bool = False, source: str = "training examples"):
        if not examples:
            raise InputError(f"{source}: no training examples")
        self.examples = examples
        self.group_size, self.per_device = group_size, per_device
        self.world_size, self.accumulation, self.seed = world_size, accumulation, seed
        # An item is (example index, positive index or -1 for "draw one").
        self.items: list[tuple[int, int]] = (
            [(i, j) for i, ex in enumerate(examples) for j in range(len(ex.positives))]
            if per_positive else [(i, -1) for i in range(len(examples))])
        self.items_per_step = per_device * world_size * accumulation
        self.steps_per_epoch = len(self.items) // self.items_per_step
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{source}: {len(self.items)} training items are fewer than one optimizer step "
                f"takes ({per_device} per worker x {world_size} workers x {accumulation} "
                "accumulation steps)")

    def total_steps(self, epochs: float, max_steps: int | None = None) -> int:
        if max_steps:
            return int(max_steps)
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def _group(self, epoch: int, item: int) -> tuple[str, list[str], str]:
        index, positive = self.items[item]
        ex = self.examples[index]
        rng = np.random.default_rng([self.seed, epoch, item])
        if positive < 0:
            positive = int(rng.integers(len(ex.positives)))
        passages = [ex.positives[positive]]
        need = self.group_size - 1
        if need:
            if len(ex.negatives) >= need:
                picks = rng.choice(len(ex.negatives), size=need, replace=False)
                passages += [ex.negatives[int(k)] for k in picks]
            elif ex.negatives:
                picks = rng.choice(len(ex.negatives), size=need, replace=True)
                passages += [ex.negatives[int(k)] for k in picks]
            else:  # random negatives: positives of other queries
                others = [k for k in rng.integers(len(self.examples), size=4 * need)
                          if int(k) != index][:need]
                while len(others) < need:  # a single example: fall back to itself
                    others.append(index)
                for k in others:
                    other = self.examples[int(k)]
                    passages.append(other.positives[int(rng.integers(len(other.positives)))])
        return ex.query, passages, query_key(ex)

    def micro_batch(self, step: int, micro: int, rank: int) -> MicroBatch:
        """The queries and passage groups worker ``rank`` trains on at ``(step, micro)``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        start = within * self.items_per_step + (micro * self.world_size + rank) * self.per_device
        queries, passages, ids = [], [], []
        for item in order[start:start + self.per_device]:
            query, group, qid = self._group(epoch, int(item))
            queries.append(query)
            passages += group
            ids.append(qid)
        return MicroBatch(queries, passages, ids)
