"""The chunked losses of :mod:`emkd.losses.fused` against materialised float64 logits: odd shapes, ignored targets,
biases, temperatures, half-precision inputs, an empty row set, chunk sizes that do and do not divide the vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from emkd.losses.fused import fused_head_divergences, fused_head_gram
from emkd.matching.cost import head_l1_cost, l1_cost


def _ref_rows(zs, zt, kind, temperature, targets, beta):
    """float64 per-row values from full logits."""
    if kind == "ce":
        return F.cross_entropy(zs, targets, reduction="none", ignore_index=-100)
    ls, lt = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    if kind == "forward":
        return (lt.exp() * (lt - ls)).sum(-1)
    if kind == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _inputs(n=13, v=123, ds=17, dt=29, bias=True, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64) * scale / ds**0.5
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64)
    bs = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64) * scale / dt**0.5
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64)
    bt = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    return hs, ws, bs, ht, wt, bt, targets


@pytest.mark.parametrize("kinds", [("ce",), ("forward",), ("reverse",), ("jsd",), ("ce", "reverse"),
                                   ("ce", "forward", "reverse", "jsd")])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("chunk_size", [1, 10, 123, 4096])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_divergences_match_materialised_logits(kinds, temperature, chunk_size, bias):
    hs, ws, bs, ht, wt, bt, targets = _inputs(bias=bias)
    leaves = [hs.float().requires_grad_(), ws.float().requires_grad_()] + ([bs.float().requires_grad_()] if bias else [])
    out = fused_head_divergences(leaves[0], leaves[1], leaves[2] if bias else None, ht.float(), wt.float(),
                                 None if bt is None else bt.float(), kinds, temperature, targets, 0.3, chunk_size)
    assert out.shape == (hs.shape[0], len(kinds)) and out.dtype == torch.float32

    refs = [x.clone().requires_grad_() for x in (hs, ws) + ((bs,) if bias else ())]
    zs = refs[0] @ refs[1].T + (refs[2] if bias else 0)
    zt = ht @ wt.T + (bt if bias else 0)
    ref = torch.stack([_ref_rows(zs, zt, k, temperature, targets, 0.3) for k in kinds], 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream.float()).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), refs)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_chunk_backward_reuses_the_forward_logits_without_writing_them(temperature):
    """With the whole vocabulary in one chunk the backward pass reads the forward pass's logits instead of
    recomputing them: a second backward over the same graph (``retain_graph``) must give the same gradients, and
    they must equal those of the recomputing path (two chunks) within float32 rounding."""
    hs, ws, bs, ht, wt, bt, targets = (x.float() if x.is_floating_point() else x for x in _inputs())
    kinds = ("ce", "forward", "reverse", "jsd")
    grads = {}
    for chunk_size in (ws.shape[0], 64):
        leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()]
        out = fused_head_divergences(*leaves, ht, wt, bt, kinds, temperature, targets, 0.3, chunk_size)
        first = torch.autograd.grad(out.sum(), leaves, retain_graph=True)
        second = torch.autograd.grad(out.sum(), leaves)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        grads[chunk_size] = first
    for one, two in zip(grads[ws.shape[0]], grads[64]):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)

    leaves = [hs.clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()]
    gram = fused_head_gram(*leaves, chunk_size=ws.shape[0])
    first = torch.autograd.grad(gram.sum(), leaves, retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(gram.sum(), leaves)):
        assert torch.equal(a, b)


def test_ignored_targets_give_zero_ce_and_no_gradient():
    hs, ws, bs, ht, wt, bt, targets = _inputs()
    targets[:] = -100
    h = hs.float().requires_grad_()
    out = fused_head_divergences(h, ws.float(), None, None, None, None, ("ce",), targets=targets, chunk_size=7)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h.grad))


def test_teacher_gets_no_gradient_and_empty_rows_stay_on_the_graph():
    hs, ws, bs, ht, wt, bt, targets = _inputs()
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    t_h, t_w = ht.float().requires_grad_(), wt.float().requires_grad_()
    fused_head_divergences(h, w, None, t_h, t_w, None, ("reverse",), chunk_size=16).sum().backward()
    assert t_h.grad is None and t_w.grad is None and h.grad is not None and w.grad is not None

    empty = fused_head_divergences(h[:0], w, None, t_h[:0], t_w, None, ("forward", "ce"),
                                   targets=torch.empty(0, dtype=torch.long))
    assert empty.shape == (0, 2)
    assert empty.sum().requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_upcast_per_chunk(dtype):
    hs, ws, bs, ht, wt, bt, targets = _inputs()
    cast = [x.to(dtype) for x in (hs, ws, bs, ht, wt, bt)]
    h = cast[0].clone().requires_grad_()
    out = fused_head_divergences(h, cast[1], cast[2], cast[3], cast[4], cast[5], ("ce", "reverse"),
                                 targets=targets, chunk_size=32)
    up = [x.double() for x in cast]
    zs, zt = up[0] @ up[1].T + up[2], up[3] @ up[4].T + up[5]
    ref = torch.stack([_ref_rows(zs, zt, k, 1.0, targets, 0.5) for k in ("ce", "reverse")], 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert h.grad.dtype == dtype


def test_argument_errors():
    hs, ws, bs, ht, wt, bt, targets = _inputs()
    with pytest.raises(ValueError, match="kinds"):
        fused_head_divergences(hs, ws, bs, ht, wt, bt, ("kl",))
    with pytest.raises(ValueError, match="need teacher rows"):
        fused_head_divergences(hs, ws, bs, None, None, None, ("reverse",))
    with pytest.raises(ValueError, match="targets"):
        fused_head_divergences(hs, ws, bs, ht, wt, bt, ("ce",))
    with pytest.raises(ValueError, match="do not pair"):
        fused_head_divergences(hs, ws, bs, ht[:3], wt, bt, ("forward",))


@pytest.mark.parametrize("chunk_size", [1, 9, 123, 1000])
def test_fused_gram_matches_materialised_logits(chunk_size):
    hs, ws, bs, *_ = _inputs(n=6)
    leaves = [x.float().requires_grad_() for x in (hs, ws, bs)]
    gram = fused_head_gram(*leaves, chunk_size=chunk_size)
    refs = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    z = refs[0] @ refs[1].T + refs[2]
    ref = z @ z.T
    torch.testing.assert_close(gram.double(), ref, rtol=1e-4, atol=1e-3)
    upstream = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((gram * upstream.float()).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), refs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double() / want.abs().max(), want / want.abs().max(), rtol=0, atol=1e-5)


def test_batched_fused_gram_equals_one_at_a_time():
    hs, ws, bs, *_ = _inputs(n=12)
    h = hs.float().reshape(3, 4, -1).requires_grad_()
    w, b = ws.float().requires_grad_(), bs.float().requires_grad_()
    upstream = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2))
    batched = fused_head_gram(h, w, b, chunk_size=10)
    grads = torch.autograd.grad((batched * upstream).sum(), (h, w, b))
    single = torch.stack([fused_head_gram(h[g], w, b, chunk_size=10) for g in range(3)])
    ref_grads = torch.autograd.grad((single * upstream).sum(), (h, w, b))
    torch.testing.assert_close(batched, single)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 50, 123, 5000])
def test_head_l1_cost_equals_l1_cost_of_logits(chunk_size):
    hs, ws, bs, ht, wt, bt, _ = _inputs(n=9)
    hs, ht = hs[:5], ht
    cost = head_l1_cost(hs.float(), ws.float(), bs.float(), ht.float(), wt.float(), bt.float(), chunk_size)
    full = l1_cost((hs @ ws.T + bs).float(), (ht @ wt.T + bt).float())
    assert cost.shape == (5, 9)
    torch.testing.assert_close(cost, full, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        head_l1_cost(hs, ws, bs, ht, wt[:50], None)


def test_pair_batch_groups_equal_shapes_and_matches_per_sample_pairing():
    """Samples with equal token counts share one batched cost pass; the pairs are those of one sample at a time."""
    from conftest import SampleSpec as S
    from conftest import make_pair
    from emkd.matching.pairing import pair_batch, pair_vision_tokens

    samples = (S(2, 4, 9, 3, 4), S(1, 4, 9, 2, 3, pad=2), S(3, 0, 5, 2, 2), S(2, 5, 7, 3, 3), S(1, 4, 9, 4, 2))
    student, teacher = make_pair(samples, student_bias=True, seed=4)
    batched = pair_batch(student, teacher, "hungarian_logits", "fused", chunk_size=8)
    for b in range(len(samples)):
        one = pair_vision_tokens(student, teacher, b, "hungarian_logits", "naive")
        if one is None:
            assert batched[b] is None
            continue
        assert torch.equal(batched[b].idx_s, one.idx_s) and torch.equal(batched[b].idx_t, one.idx_t)
        torch.testing.assert_close(batched[b].student_hidden, one.student_hidden)
        torch.testing.assert_close(batched[b].teacher_hidden, one.teacher_hidden)
    mixed = pair_batch(student, teacher, ["identity" if s.ns == s.nt else "avgpool" for s in samples], "fused")
    assert [p is None for p in mixed] == [s.ns == 0 or s.nt == 0 for s in samples]


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 1, 5], [2]])
def test_sum_of_means_is_the_per_sample_loop(sizes):
    """VSD's reduction: per-sample means summed, one reduction for the batch, the same value and gradient."""
    from emkd.losses.emkd import sum_of_means

    g = torch.Generator().manual_seed(len(sizes))
    values = torch.rand(sum(sizes), generator=g, dtype=torch.float64, requires_grad=True)
    got = sum_of_means(values, sizes)
    want = torch.stack([part.mean() for part in values.split(sizes)]).sum()
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, values)[0], torch.autograd.grad(want, values)[0])
