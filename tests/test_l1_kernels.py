"""The L1 cost backends (:mod:`emkd.matching.l1_kernels`): the numba kernel against ``torch.cdist`` (the reference) on
odd shapes, batches, half-precision inputs and empty sides; the same Hungarian matches; ``auto``'s fallback when
numba is absent; and ``head_l1_cost``'s bfloat16 matching logits.

The numba tests skip when numba is not installed (it is the optional ``emkd[fast]`` extra; the dev extra installs it).
"""

from __future__ import annotations

import pytest
import torch

import emkd
from emkd.matching import head_l1_cost, hungarian_match, l1_cost, l1_kernels

# (Ns, Nt, F): tiles are 6 student x 4 teacher rows, so these cover full tiles, partial tiles on either side and both,
# single rows and a feature count that is no multiple of any vector width.
ODD_SHAPES = [(3, 5, 47), (1, 1, 1), (6, 4, 16), (7, 9, 33), (13, 5, 131), (144, 29, 7), (5, 3, 1), (16, 64, 20), (11, 13, 3)]


def naive_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[Ns, Nt]`` float64 ``sum_f |a[i, f] - b[j, f]|`` by broadcasting (small inputs only)."""
    return (a.double()[:, None, :] - b.double()[None, :, :]).abs().sum(-1)


def _rows(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def without_numba(monkeypatch):
    """The kernel module as if numba were not installed."""
    monkeypatch.setitem(l1_kernels._KERNELS, "numba", "ModuleNotFoundError: No module named 'numba'")


# ---- numba kernel == cdist --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ns", "nt", "f"), ODD_SHAPES)
@pytest.mark.parametrize("chunk_size", [8192, 10])
def test_numba_l1_cost_equals_cdist_on_odd_shapes(ns, nt, f, chunk_size):
    pytest.importorskip("numba")
    a, b = _rows((ns, f), ns * 1000 + f), _rows((nt, f), nt * 1000 + f + 1)
    got = l1_cost(a, b, chunk_size=chunk_size, backend="numba")
    ref = l1_cost(a, b, chunk_size=chunk_size, backend="cdist")
    assert got.shape == (ns, nt) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), naive_l1(a, b), rtol=1e-5, atol=1e-4)


def test_numba_sums_large_feature_counts_accurately():
    """151,936 features, as the paper's vocabulary: float32 sums agree with float64 within 1e-5 relative."""
    pytest.importorskip("numba")
    a, b = _rows((7, 151_936), 1), _rows((5, 151_936), 2)
    ref = naive_l1(a, b)
    for backend in ("numba", "cdist"):
        torch.testing.assert_close(l1_cost(a, b, backend=backend).double(), ref, rtol=1e-5, atol=0, msg=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_numba_casts_other_dtypes_to_float32(dtype):
    pytest.importorskip("numba")
    a, b = _rows((5, 47), 3).to(dtype), _rows((7, 47), 4).to(dtype)
    got = l1_cost(a, b, backend="numba")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, l1_cost(a.float(), b.float(), backend="cdist"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("ns", "nt", "f"), [(0, 5, 8), (4, 0, 8), (0, 0, 8), (3, 4, 0)])
def test_numba_empty_sides_give_empty_or_zero_costs(ns, nt, f):
    pytest.importorskip("numba")
    a, b = torch.randn(ns, f), torch.randn(nt, f)
    got = l1_cost(a, b, backend="numba")
    assert got.shape == (ns, nt)
    assert torch.equal(got, torch.zeros(ns, nt))


def test_numba_accumulates_into_a_batched_out_in_place():
    """``l1_accumulate`` adds to ``out`` (it does not overwrite it), one ``[Ns, Nt]`` block per leading index."""
    pytest.importorskip("numba")
    a, b = _rows((3, 7, 19), 5), _rows((3, 10, 19), 6)  # (G, Ns, F), (G, Nt, F)
    start = _rows((3, 7, 10), 7)
    out = start.clone()
    l1_kernels.l1_accumulate(a, b, out, "numba")
    ref = start.double() + torch.stack([naive_l1(a[g], b[g]) for g in range(3)])
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        l1_kernels.l1_accumulate(a, b, out.transpose(1, 2).contiguous().transpose(1, 2), "numba")


def test_numba_propagates_non_finite_values():
    pytest.importorskip("numba")
    a, b = torch.randn(6, 9), torch.randn(4, 9)
    a[2, 3] = float("nan")
    b[1, 0] = float("inf")
    got, ref = l1_cost(a, b, backend="numba"), l1_cost(a, b, backend="cdist")
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())


# ---- head_l1_cost ---------------------------------------------------------------------------------------------------
def _head_inputs(g: int | None, ns: int = 7, nt: int = 11, v: int = 101, ds: int = 16, dt: int = 12):
    lead = () if g is None else (g,)
    return (_rows((*lead, ns, ds), 10, 1.0), _rows((v, ds), 11, 0.3), _rows((v,), 12, 0.1),
            _rows((*lead, nt, dt), 13, 1.0), _rows((v, dt), 14, 0.3), _rows((v,), 15, 0.1))


@pytest.mark.parametrize("g", [None, 1, 3])
@pytest.mark.parametrize("chunk_size", [1, 10, 1024])
def test_numba_head_l1_cost_equals_cdist(g, chunk_size):
    pytest.importorskip("numba")
    inputs = _head_inputs(g)
    got = head_l1_cost(*inputs, chunk_size=chunk_size, backend="numba")
    ref = head_l1_cost(*inputs, chunk_size=chunk_size, backend="cdist")
    assert got.shape == ref.shape == (*(() if g is None else (g,)), 7, 11)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_numba_and_cdist_give_the_same_hungarian_matches(seed):
    """Random logits over a 4,096-entry vocabulary, 24 student and 90 teacher tokens per sample, two samples."""
    pytest.importorskip("numba")
    gen = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(2, 24, 32, generator=gen), torch.randn(2, 90, 32, generator=gen)
    ws, wt = torch.randn(4096, 32, generator=gen), torch.randn(4096, 32, generator=gen)
    got = head_l1_cost(hs, ws, None, ht, wt, None, backend="numba")
    ref = head_l1_cost(hs, ws, None, ht, wt, None, backend="cdist")
    for b in range(2):
        for x, y in zip(hungarian_match(got[b]), hungarian_match(ref[b])):
            assert torch.equal(x, y)


def test_bfloat16_matching_logits_stay_close_and_are_opt_in():
    inputs = _head_inputs(2)
    ref = head_l1_cost(*inputs, backend="cdist")
    assert torch.equal(head_l1_cost(*inputs, backend="cdist", matching_dtype="float32"), ref)
    low = head_l1_cost(*inputs, backend="cdist", matching_dtype="bfloat16")
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=0)
    # bfloat16 logits, as documented: bfloat16 products of bfloat16 rows and head, then the float32 bias
    hs, ws, bs, ht, wt, bt = inputs
    zs = (hs.bfloat16() @ ws.bfloat16().T).float() + bs  # (G, Ns, V)
    zt = (ht.bfloat16() @ wt.bfloat16().T).float() + bt  # (G, Nt, V)
    want = torch.stack([naive_l1(zs[g], zt[g]) for g in range(2)])
    torch.testing.assert_close(low.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="matching_dtype must be one of"):
        head_l1_cost(*inputs, matching_dtype="float16")


def test_bfloat16_matching_logits_with_numba_equal_cdist():
    pytest.importorskip("numba")
    inputs = _head_inputs(2)
    torch.testing.assert_close(head_l1_cost(*inputs, backend="numba", matching_dtype="bfloat16"),
                               head_l1_cost(*inputs, backend="cdist", matching_dtype="bfloat16"), rtol=1e-5, atol=1e-5)


# ---- backend selection ----------------------------------------------------------------------------------------------
def test_auto_uses_numba_on_cpu_when_it_imports():
    pytest.importorskip("numba")
    assert l1_kernels.resolve_backend("auto", torch.zeros(1)) == "numba"


def test_auto_falls_back_to_cdist_without_numba(without_numba):
    assert not l1_kernels.numba_available()
    assert l1_kernels.resolve_backend("auto", torch.zeros(1)) == "cdist"
    a, b = _rows((3, 47), 20), _rows((5, 47), 21)
    torch.testing.assert_close(l1_cost(a, b).double(), naive_l1(a, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(emkd.l1_cost(a, b), l1_cost(a, b, backend="cdist"), rtol=0, atol=0)
    inputs = _head_inputs(2)
    assert torch.equal(head_l1_cost(*inputs), head_l1_cost(*inputs, backend="cdist"))


def test_numba_backend_without_numba_says_how_to_install_it(without_numba):
    a, b = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ImportError, match=r"backend='numba' needs numba.*No module named 'numba'.*emkd\[fast\]"):
        l1_cost(a, b, backend="numba")
    with pytest.raises(ImportError, match="emkd\\[fast\\]"):
        head_l1_cost(*_head_inputs(None), backend="numba")
    with pytest.raises(ImportError, match="emkd\\[fast\\]"):
        l1_kernels.l1_accumulate(a, b, torch.zeros(3, 5), "numba")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cdist', 'numba', 'triton'\), got 'cuda'"):
        l1_cost(torch.zeros(3, 4), torch.zeros(5, 4), backend="cuda")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        l1_kernels.l1_accumulate(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, 5), "auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_numba_backend_refuses_gpu_tensors_and_auto_takes_cdist():
    a, b = torch.randn(3, 4, device="cuda"), torch.randn(5, 4, device="cuda")
    assert l1_kernels.resolve_backend("auto", a, b) == "cdist"
    if l1_kernels.numba_available():
        with pytest.raises(ValueError, match="CPU tensors only"):
            l1_cost(a, b, backend="numba")
