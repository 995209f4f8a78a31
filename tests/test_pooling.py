import torch

from retriever.modeling.pooling import pool


def _batch():
    torch.manual_seed(0)
    return torch.randn(2, 5, 3)


def test_last_token_right_padding():
    hidden = _batch()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = pool(hidden, mask, "last")
    assert torch.equal(out[0], hidden[0, 2])
    assert torch.equal(out[1], hidden[1, 4])


def test_last_token_left_padding():
    hidden = _batch()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = pool(hidden, mask, "last")
    assert torch.equal(out[0], hidden[0, 4])
    assert torch.equal(out[1], hidden[1, 4])


def test_last_token_same_under_both_paddings_with_real_model_states():
    """Same texts padded left and right give the same last-token vector."""
    hidden_right = _batch()
    mask_right = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    # shift each row's real tokens to the end to build the left-padded equivalent
    hidden_left = torch.zeros_like(hidden_right)
    mask_left = torch.zeros_like(mask_right)
    for row in range(2):
        n = int(mask_right[row].sum())
        hidden_left[row, 5 - n:] = hidden_right[row, :n]
        mask_left[row, 5 - n:] = 1
    assert torch.equal(pool(hidden_right, mask_right, "last"), pool(hidden_left, mask_left, "last"))


def test_mean_ignores_padding_and_cls_takes_first_real_token():
    hidden = _batch()
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    mean = pool(hidden, mask, "mean")
    assert torch.allclose(mean[0], hidden[0, :2].mean(0))
    assert torch.allclose(mean[1], hidden[1, 2:].mean(0))
    cls = pool(hidden, mask, "cls")
    assert torch.equal(cls[0], hidden[0, 0]) and torch.equal(cls[1], hidden[1, 2])


def test_unknown_pooling_is_named():
    import pytest

    with pytest.raises(ValueError, match="pooling 'max'"):
        pool(_batch(), torch.ones(2, 5), "max")
