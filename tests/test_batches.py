"""Training batches: query keys that keep in-batch negatives when examples carry no query id."""

import torch

from retriever.io.formats import TrainingExample
from retriever.training.batches import GroupSampler, query_key
from retriever.training.losses import info_nce

QUERIES = [f"what is topic {n}?" for n in range(8)]


def _examples(with_ids: bool) -> list[TrainingExample]:
    return [TrainingExample(query=q, positives=[f"passage about topic {n}"],
                            query_id=f"q{n}" if with_ids else "")
            for n, q in enumerate(QUERIES)]


def _loss(examples: list[TrainingExample]) -> float:
    """The loss of step 0 as the training loop computes it (keys hashed by the loop's rule)."""
    from retriever.training.loop import query_keys

    sampler = GroupSampler(examples, group_size=1, per_device=8, world_size=1)
    batch = sampler.micro_batch(0, 0, 0)
    torch.manual_seed(0)
    table = {text: torch.randn(16) for text in batch.queries + batch.passages}
    embed = lambda texts: torch.nn.functional.normalize(  # noqa: E731
        torch.stack([table[t] for t in texts]), dim=-1)
    keys = query_keys(batch.query_ids, torch.device("cpu"))
    return info_nce(embed(batch.queries), embed(batch.passages), temperature=0.05,
                    group_size=1, query_keys=keys).item()


def test_examples_without_query_ids_keep_their_in_batch_negatives():
    without, with_ids = _loss(_examples(False)), _loss(_examples(True))
    assert without > 0.1  # an all-masked batch would give exactly 0
    assert abs(without - with_ids) < 1e-6


def test_query_key_prefers_the_id_and_separates_ids_from_texts():
    assert query_key(TrainingExample(query="x", positives=["p"], query_id="7")) == "7"
    assert query_key(TrainingExample(query="7", positives=["p"])) == "\0text:7"
    same_text = [TrainingExample(query="same", positives=["a"]),
                 TrainingExample(query="same", positives=["b"])]
    assert query_key(same_text[0]) == query_key(same_text[1])  # one query: masked as before
