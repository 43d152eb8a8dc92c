"""The row gathers of :mod:`emkd.inputs` against the plain indexing they replace, values and gradients."""

from __future__ import annotations

import pytest
import torch

from emkd.inputs import DistillInputs, joined_rows, masked_rows, padded_rows


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


@pytest.mark.parametrize("sizes", [[3, 1, 4], [2, 2, 2, 2], [0, 2, 2]])
def test_padded_rows_of_split_pieces_is_pad_sequence(sizes):
    """The pieces of one tensor's split: equal sizes come back as a view of that tensor, and either way the values
    and the gradient reaching the split tensor are pad_sequence's."""
    g = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn(sum(sizes), 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(len(sizes), max(sizes), 4, generator=g, dtype=torch.float64)
    got = padded_rows(list(x.split(sizes)))
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    want = torch.nn.utils.rnn.pad_sequence(list(x.split(sizes)), batch_first=True)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), x)
    assert torch.equal(got, want) and torch.equal(grad_got, grad_want)
    if min(sizes) == max(sizes):
        assert got.data_ptr() == x.data_ptr()  # no copy


def _pieces(kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A tensor and blocks of it that ``joined_rows`` must concatenate: views back to back, or anything else."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    if kind == "whole split":
        return x, list(x.split([4, 1, 5]))
    if kind == "middle of a split":
        return x, list(x.split([2, 3, 4, 1]))[1:3]
    if kind == "unbind":
        return x, list(x.unbind(0))
    if kind == "out of order":
        return x, list(x.split([4, 6]))[::-1]
    if kind == "a gap":
        parts = list(x.split([2, 3, 5]))
        return x, [parts[0], parts[2]]
    if kind == "two tensors":
        y = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
        return x, [*x.split([5, 5]), y]
    if kind == "copies":
        return x, [x[:4] * 1.0, x[4:] * 1.0]
    if kind == "strided columns":
        return x, list(x[:, :2].split([5, 5]))
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind", ["whole split", "middle of a split", "unbind", "out of order", "a gap", "two tensors", "copies",
             "strided columns"],
)
def test_joined_rows_is_cat(kind):
    x, blocks = _pieces(kind)
    got = joined_rows(blocks)
    want = torch.cat(blocks)
    assert got.shape == want.shape and torch.equal(got, want)
    weights = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [x] + [b for b in blocks if b.is_leaf and b is not x]
    grads_got = torch.autograd.grad((got * weights).sum(), leaves, allow_unused=True, retain_graph=True)
    grads_want = torch.autograd.grad((want * weights).sum(), leaves, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads_got, grads_want))
    viewed = kind in ("whole split", "middle of a split", "unbind")
    assert (got._base is x or got is x) == viewed  # a view exactly when the blocks lie back to back in x


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
