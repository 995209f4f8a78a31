import math

import pytest
import torch

from retriever.losses import info_nce


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
