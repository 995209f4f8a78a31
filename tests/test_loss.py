import math

import pytest
import torch

from retriever.training.losses import info_nce


def test_info_nce_matches_hand_computed_value():
    # 2 queries, group size 2 (positive + 1 hard negative) -> 4 candidates per query.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    t = 0.5
    # query 0 scores: [1, .6, 0, .8] / t ; target index 0
    s0 = [1 / t, 0.6 / t, 0.0, 0.8 / t]
    l0 = -s0[0] + math.log(sum(math.exp(x) for x in s0))
    # query 1 scores: [0, .8, 1, .6] / t ; target index 2
    s1 = [0.0, 0.8 / t, 1 / t, 0.6 / t]
    l1 = -s1[2] + math.log(sum(math.exp(x) for x in s1))
    expected = (l0 + l1) / 2
    assert info_nce(q, p, temperature=t).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(q, p, temperature=t, group_size=2).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_gradient_flows_and_lower_temperature_sharpens():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    p = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    loss = info_nce(q, p, temperature=0.02)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_info_nce_rejects_bad_shapes_and_temperature():
    q, p = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="do not divide"):
        info_nce(q, p)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, torch.randn(6, 4), temperature=0)


def test_info_nce_masks_the_same_querys_other_positives():
    # Two items of one query (key 7, e.g. one per relevant doc) and one of another (key 9).
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0],     # item 0: its positive, a negative
                      [0.9, 0.1], [0.5, 0.5],     # item 1: the same query's other positive
                      [0.0, 1.0], [0.8, 0.6]])    # item 2: another query
    t = 0.5
    keys = torch.tensor([7, 7, 9])
    scores = (q @ p.T / t).tolist()

    def nll(row, target, excluded):
        kept = [s for j, s in enumerate(scores[row]) if j not in excluded]
        return -scores[row][target] + math.log(sum(math.exp(s) for s in kept))

    # query 0 may not be pushed away from row 2, query 1 not from row 0; query 2 keeps all
    expected = (nll(0, 0, {2}) + nll(1, 2, {0}) + nll(2, 4, set())) / 3
    assert info_nce(q, p, t, 2, query_keys=keys).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(q, p, t, 2, query_keys=torch.tensor([1, 2, 3])).item() == pytest.approx(
        info_nce(q, p, t, 2).item(), rel=1e-6)  # distinct queries: nothing masked


def test_matryoshka_loss_is_the_weighted_sum_over_renormalised_prefixes():
    import torch.nn.functional as F

    from retriever.training.losses import contrastive_loss, matryoshka_dims

    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 16), dim=-1)
    p = F.normalize(torch.randn(12, 16), dim=-1)
    plain = info_nce(q, p, temperature=0.05)
    assert contrastive_loss(q, p, 0.05).item() == pytest.approx(plain.item(), rel=1e-7)
    expected = (0.5 * info_nce(F.normalize(q[:, :4], dim=-1), F.normalize(p[:, :4], dim=-1), 0.05)
                + 1.0 * info_nce(F.normalize(q[:, :8], dim=-1), F.normalize(p[:, :8], dim=-1),
                                 0.05)
                + 2.0 * plain)
    found = contrastive_loss(q, p, 0.05, dims=[4, 8], weights=[0.5, 1.0, 2.0])
    assert found.item() == pytest.approx(expected.item(), rel=1e-6)
    assert matryoshka_dims([4, 8], 16) == [4, 8, 16] and matryoshka_dims([4, 16], 16) == [4, 16]
    assert matryoshka_dims(None, 16) == [16]
    with pytest.raises(ValueError, match="larger than the embedding size 16"):
        contrastive_loss(q, p, 0.05, dims=[32])
    with pytest.raises(ValueError, match="one per dimension"):
        contrastive_loss(q, p, 0.05, dims=[4], weights=[1.0])


def test_training_options_are_checked():
    from retriever.training.config import TrainConfig

    with pytest.raises(ValueError, match="grad_cache_chunk"):
        TrainConfig(train_data="x", grad_cache_chunk=0)
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(train_data="x", matryoshka_dims=[128, 64])
    with pytest.raises(ValueError, match="without matryoshka_dims"):
        TrainConfig(train_data="x", matryoshka_weights=[1.0])
    # off by default: the fingerprint of a run without them is what it was before they existed
    config = TrainConfig(train_data="x")
    assert "matryoshka_dims" not in config.essential()
    assert "grad_cache_chunk" not in config.essential()  # same gradients: a resumable change


def test_grad_cache_chunks_cover_the_batch():
    from retriever.training.gradcache import chunk_slices

    assert chunk_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert chunk_slices(2, 3) == [slice(0, 2)]
    with pytest.raises(ValueError, match="chunk"):
        chunk_slices(4, 0)
