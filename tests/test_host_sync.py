"""No host synchronisation inside the chunk loops of the fused losses and of the matching cost.

On a GPU the host queues a chunk's kernels while the device still runs the previous ones, as long as the host never
waits for a value computed on the device. ``.item()``, ``bool(tensor)`` (``if tensor:``), ``nonzero()``, indexing
with a boolean mask, ``unique``, ``masked_select`` and copies to the host each make it wait. These tests run on the
CPU under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every operator PyTorch dispatches and
recognises the synchronising ones (:func:`synchronises`); on a CUDA machine the tests of the chunked functions also
run on the GPU, under PyTorch's own ``torch.cuda.set_sync_debug_mode("error")`` as well.

* The chunked functions (:func:`fused_head_divergences` and :func:`fused_head_gram`, forward and backward;
  :func:`head_l1_cost`; :func:`l1_cost`) hold nothing but their chunk loops and shape checks: they run under a mode
  that raises at the first synchronising operator.
* The losses (EM-KD, LLaVA-KD, KD, SFT: forward and backward) synchronise outside the loops, per call or per sample:
  ``DistillInputs``' boolean masks pick the response, vision and text rows, whose counts set tensor shapes. They run
  under a mode that counts synchronising operators, once with one chunk per loop and once with eight, and the two
  counts must be equal: nothing in a chunk loop synchronises. The Hungarian assignment is excluded explicitly (its
  calls run with the counting paused): SciPy solves it on the host, so copying the finished cost there is a
  legitimate synchronisation, once per group of samples, after the cost's chunk loop.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import emkd.matching.pairing as pairing
from conftest import SampleSpec as S
from conftest import make_pair, with_leaves
from emkd import EMKDLoss, KDLoss, LlavaKDLoss
from emkd.losses import SFTLoss
from emkd.losses.fused import fused_head_divergences, fused_head_gram
from emkd.matching.cost import head_l1_cost, l1_cost
from emkd.matching.l1_kernels import numba_available

aten = torch.ops.aten

#: operators that make the host wait for the device whatever their arguments
SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t)
    aten.item,
    aten.is_nonzero,  # bool(t), if t:
    aten.equal,  # returns a Python bool
    aten.nonzero,  # output size depends on the data
    aten.argwhere,
    aten.masked_select,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
    aten._unique,
    aten._unique2,
    aten.bincount,
    aten.repeat_interleave,  # without output_size
}
#: operators that synchronise when an index is a boolean mask (a hidden nonzero)
MASK_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synchronises(func, args, kwargs) -> bool:
    """Whether ``func(*args, **kwargs)`` makes the host wait for a value computed on the device."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet in MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if packet in (aten._to_copy, aten.copy_):  # a copy from an accelerator to the host
        src = args[1] if packet is aten.copy_ else args[0]
        dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
        return src.device.type != "cpu" and torch.device(dst).type == "cpu"
    return False


class SyncMode(TorchDispatchMode):
    """Records every synchronising operator dispatched while active (``strict``: raises at the first one);
    :meth:`excluded` pauses it."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.calls: list[str] = []
        self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused and synchronises(func, args, kwargs):
            if self.strict:
                raise AssertionError(f"host synchronisation: {func}")
            self.calls.append(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def excluded(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


@contextlib.contextmanager
def no_sync(device: str):
    """Raise at the first synchronising operator (on CUDA, PyTorch's own sync debug mode raises too)."""
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with SyncMode(strict=True):
            yield
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def _rows(device, n=13, v=123, ds=17, dt=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*shape, generator=g) for shape in ((n, ds), (v, ds), (v,), (n, dt), (v, dt), (v,))]
    hs, ws, bs, ht, wt, bt = (x.to(device, dtype) for x in t)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    return hs, ws, bs, ht, wt, bt, targets.to(device)


def test_the_mode_sees_the_synchronising_operators():
    x = torch.randn(6, 3)
    mask = x[:, 0] > 0
    for sync in (lambda: bool(mask.any()), lambda: x.sum().item(), lambda: int(mask.sum()), lambda: mask.nonzero(),
                 lambda: x[mask], lambda: x.__setitem__(mask, 0.0), lambda: torch.unique(mask),
                 lambda: torch.masked_select(x, mask[:, None])):
        with pytest.raises(AssertionError, match="host synchronisation"), SyncMode(strict=True):
            sync()
    with SyncMode(strict=True):  # what the loops do instead
        torch.where(mask, x[:, 0], 0.0)
        x.gather(1, torch.zeros(6, 1, dtype=torch.long))
        x.scatter_add_(1, torch.zeros(6, 1, dtype=torch.long), x[:, :1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_divergences_forward_and_backward_do_not_synchronise(device, dtype, temperature):
    hs, ws, bs, ht, wt, bt, targets = _rows(device, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
    with no_sync(device):
        out = fused_head_divergences(*leaves, ht, wt, bt, ("ce", "forward", "reverse", "jsd"), temperature,
                                     targets, 0.3, chunk_size=10)  # 13 chunks, the last one short
        grads = torch.autograd.grad(out.sum(), leaves)
    assert out.shape == (13, 4) and all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gram_forward_and_backward_do_not_synchronise(device):
    hs, ws, bs, *_ = _rows(device, n=12)
    leaves = [hs.reshape(3, 4, -1).clone().requires_grad_(), ws.clone().requires_grad_(), bs.clone().requires_grad_()]
    with no_sync(device):
        gram = fused_head_gram(*leaves, chunk_size=10)
        torch.autograd.grad(gram.sum(), leaves)
    assert gram.shape == (3, 4, 4)


BACKENDS = ["cdist"] + (["numba"] if numba_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matching_costs_do_not_synchronise(device, backend):
    if backend == "numba" and device != "cpu":
        pytest.skip("the numba kernel runs on CPU tensors only")
    hs, ws, bs, ht, wt, bt, _ = _rows(device, n=9)
    with no_sync(device):
        cost = head_l1_cost(hs[:2].reshape(1, 2, -1), ws, bs, ht.reshape(1, 9, -1), wt, bt, chunk_size=10,
                            backend=backend)  # one group, 13 chunks
        feature_cost = l1_cost(hs, ht[:, :17], chunk_size=5, backend=backend)  # 4 chunks of features
    assert cost.shape == (1, 2, 9) and feature_cost.shape == (9, 9)


# Three samples: unequal vision token counts (the matching runs), padding, one sample without vision tokens.
SAMPLES = (S(2, 4, 9, 3, 4, pad=1), S(1, 3, 7, 2, 3), S(3, 0, 5, 2, 2, pad=2))
V = 37
LOSSES = {
    "emkd": lambda chunk: EMKDLoss(chunk_size=chunk),
    "emkd_hidden_matching": lambda chunk: EMKDLoss(matching="hungarian_hidden", chunk_size=chunk),
    "llava_kd": lambda chunk: LlavaKDLoss(chunk_size=chunk),
    "kd_forward": lambda chunk: KDLoss(chunk_size=chunk),
    "kd_jsd": lambda chunk: KDLoss(divergence="jsd", chunk_size=chunk),
    "minillm_reverse": lambda chunk: KDLoss(divergence="reverse", ce_weight=0.5, kd_weight=0.5, chunk_size=chunk),
    "sft": lambda chunk: SFTLoss(chunk_size=chunk),
}


def _count_syncs(name: str, chunk_size: int, monkeypatch) -> list[str]:
    """The synchronising operators of one forward and backward of loss ``name``, the Hungarian assignment's excluded."""
    student, teacher = make_pair(SAMPLES, ds=16, dt=16, vs=V, student_bias=True, seed=5)
    student = with_leaves(student)
    loss_fn = LOSSES[name](chunk_size)
    mode = SyncMode()

    def excluded(solve):
        def run(*args, **kwargs):
            with mode.excluded():
                return solve(*args, **kwargs)
        return run

    for solver in ("hungarian_match", "hungarian_match_batch"):
        monkeypatch.setattr(pairing, solver, excluded(getattr(pairing, solver)))
    with mode:
        out = loss_fn(student, teacher) if name != "sft" else loss_fn(student)
        out.loss.backward()
    assert student.hidden.grad is not None and student.head_weight.grad is not None
    return mode.calls


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_synchronises_as_often_with_eight_chunks_as_with_one(name, monkeypatch):
    one = _count_syncs(name, V, monkeypatch)  # one chunk per loop
    eight = _count_syncs(name, math.ceil(V / 8), monkeypatch)  # eight chunks per loop, the last one short
    assert len(range(0, V, math.ceil(V / 8))) == 8
    assert sorted(eight) == sorted(one), f"{name}: {len(one)} synchronisations with 1 chunk, {len(eight)} with 8"
