"""The row gathers of :mod:`emkd.inputs` against the plain indexing they replace, values and gradients."""

from __future__ import annotations

import pytest
import torch

from emkd.inputs import DistillInputs, masked_rows, padded_rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_rows_is_boolean_indexing(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7, generator=g) < 0.5
    mask[1] = False  # a sample without rows
    weights = torch.randn(int(mask.sum()), 5, generator=g, dtype=torch.float64)
    got = masked_rows(x, mask)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    want = x[mask]
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)


@pytest.mark.parametrize("sizes", [[3, 1, 4], [2], [0, 2, 2], [5, 5]])
def test_padded_rows_is_pad_sequence(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    rows = [torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True) for n in sizes]
    weights = torch.randn(len(sizes), max(sizes), 4, generator=g, dtype=torch.float64)
    got = padded_rows(rows)
    grads_got = torch.autograd.grad((got * weights).sum(), rows)
    want = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    grads_want = torch.autograd.grad((want * weights).sum(), rows)
    assert got.shape == want.shape and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(grads_got, grads_want))


def test_token_rows_are_what_the_per_sample_views_are_views_of():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 4, generator=g)
    vision = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    attention = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]], dtype=torch.bool)
    inputs = DistillInputs(hidden=hidden, head_weight=torch.randn(9, 4, generator=g), vision_mask=vision,
                           attention_mask=attention, labels=torch.full((3, 6), -100))
    for kind, view in (("vision", inputs.vision_tokens), ("text", inputs.text_tokens)):
        rows, offsets = inputs.token_rows(kind)
        mask = vision if kind == "vision" else attention & ~vision
        assert torch.equal(rows, hidden[mask])
        assert offsets == [0, *torch.cumsum(mask.sum(1), 0)[:-1].tolist()]
        for b in range(3):
            assert torch.equal(view(b), hidden[b][mask[b]])
