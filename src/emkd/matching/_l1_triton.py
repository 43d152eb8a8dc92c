"""The Triton kernel behind ``backend="triton"`` of :mod:`emkd.matching.l1_kernels` (imported only when triton is).

Each program of the ``(ceil(Ns / BLOCK_S), ceil(Nt / BLOCK_T), G)`` grid owns one ``BLOCK_S x BLOCK_T`` block of one
sample's ``[Ns, Nt]`` output. It walks the features ``BLOCK_F`` at a time: loads a ``[BLOCK_S, BLOCK_F]`` tile of
student rows and a ``[BLOCK_T, BLOCK_F]`` tile of teacher rows, and adds ``sum_f |a - b|`` over the tile's features
to a ``[BLOCK_S, BLOCK_T]`` float32 accumulator, so each value loaded serves ``BLOCK_T`` (student side) or ``BLOCK_S``
(teacher side) pairs. Masks cover the ragged edges (rows, columns and features past the end load zeros, which add
nothing, and are never stored). At the end the block is added to ``out``.

The block sizes are untuned: no GPU has run this kernel yet (docs/performance.md, section 6). On the CPU, Triton's
interpreter (``TRITON_INTERPRET=1``) runs the same kernel on CPU tensors, which is how ``tests/test_l1_triton.py``
checks it against ``torch.cdist``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # student rows per program
BLOCK_T = 32  # teacher rows per program
BLOCK_F = 8  # features per step: the [BLOCK_S, BLOCK_T, BLOCK_F] differences of one step live in registers
NUM_WARPS = 4


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on the CPU, on any tensors."""
    return bool(triton.knobs.runtime.interpret)


def language_interpreted() -> bool:
    """Whether ``triton.language``'s own kernels (``tl.zeros``, ``tl.sum``, ...) were made for the interpreter: triton
    decorates them when it is imported, so this is whether ``TRITON_INTERPRET=1`` was set then."""
    return not isinstance(tl.zeros, triton.runtime.JITFunction)


def _l1_block(
    a_ptr, b_ptr, out_ptr,
    ns, nt, nf,
    stride_ag, stride_ai, stride_af,
    stride_bg, stride_bj, stride_bf,
    stride_og, stride_oi, stride_oj,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """``out[g, i, j] += sum_f |a[g, i, f] - b[g, j, f]|`` for one ``[BLOCK_S, BLOCK_T]`` block of sample ``g``.

    ``a`` ``[G, Ns, F]``, ``b`` ``[G, Nt, F]`` (float32, any strides) and ``out`` ``[G, Ns, Nt]`` (float32) are given
    by pointer and strides; program ``(s, t, g)`` owns rows ``s * BLOCK_S ...`` and columns ``t * BLOCK_T ...`` of
    sample ``g``.
    """
    g = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    feats = tl.arange(0, BLOCK_F)  # (BLOCK_F,)
    row_ok = rows < ns
    col_ok = cols < nt
    a_rows = a_ptr + g * stride_ag + rows[:, None] * stride_ai  # (BLOCK_S, 1)
    b_rows = b_ptr + g * stride_bg + cols[:, None] * stride_bj  # (BLOCK_T, 1)
    acc = tl.zeros((BLOCK_S, BLOCK_T), dtype=tl.float32)
    for f0 in range(0, nf, BLOCK_F):
        f = f0 + feats
        f_ok = f < nf
        x = tl.load(a_rows + f[None, :] * stride_af, mask=row_ok[:, None] & f_ok[None, :], other=0.0)  # (BS, BF)
        y = tl.load(b_rows + f[None, :] * stride_bf, mask=col_ok[:, None] & f_ok[None, :], other=0.0)  # (BT, BF)
        diff = x.to(tl.float32)[:, None, :] - y.to(tl.float32)[None, :, :]  # (BLOCK_S, BLOCK_T, BLOCK_F)
        acc += tl.sum(tl.abs(diff), axis=2)
    out_ptrs = out_ptr + g * stride_og + rows[:, None] * stride_oi + cols[None, :] * stride_oj  # (BLOCK_S, BLOCK_T)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=ok, other=0.0) + acc, mask=ok)


@functools.cache
def _kernel(interpret: bool):
    """``_l1_block`` decorated with ``triton.jit``, which reads ``TRITON_INTERPRET`` when it decorates: made on first
    launch, once per setting of the variable, so that the kernel follows the variable as it is at launch time."""
    del interpret  # the cache key only
    return triton.jit(_l1_block)


def l1_accumulate(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[..., i, j] += sum_f |a[..., i, f] - b[..., j, f]|``, in place, on the tensors' device.

    Args:
        a: ``[Ns, F]`` or ``[G, Ns, F]`` float32 (student rows), any strides (other dtypes are cast to float32 first).
        b: ``[Nt, F]`` or ``[G, Nt, F]`` float32 (teacher rows), the same leading shape as ``a``.
        out: ``[Ns, Nt]`` or ``[G, Ns, Nt]`` float32, C-contiguous; each entry gets one sum over this call's ``F``
            features added.

    The tensors must be on one CUDA device, or on any device while Triton's interpreter is on; ``TRITON_INTERPRET``
    must be as it was when triton was imported (triton builds ``triton.language``'s own kernels at import). ``G`` is
    the grid's third dimension: at most 65,535 on CUDA.
    """
    if a.dim() not in (2, 3) or b.dim() != a.dim() or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"l1_accumulate: a {tuple(a.shape)} and b {tuple(b.shape)} are not [G, Ns, F] and [G, Nt, F]")
    if out.shape != (*a.shape[:-1], b.shape[-2]):
        raise ValueError(f"l1_accumulate: out must have shape {(*a.shape[:-1], b.shape[-2])}, got {tuple(out.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"l1_accumulate: out must be C-contiguous float32, got {out.dtype}, strides {out.stride()}")
    if a.device != out.device or b.device != out.device:
        raise ValueError(f"l1_accumulate: a, b and out must be on one device, got {a.device}, {b.device}, {out.device}")
    if out.device.type != "cuda" and not interpreting():
        raise ValueError(f"l1_accumulate: Triton needs CUDA tensors (or TRITON_INTERPRET=1), got {out.device}")
    if out.numel() == 0 or a.shape[-1] == 0:  # no pairs, or nothing to add
        return
    interpret = interpreting()
    if interpret != language_interpreted():
        state = {True: "set", False: "not set"}
        raise RuntimeError(
            f"l1_accumulate: TRITON_INTERPRET=1 is {state[interpret]} now but was {state[not interpret]} when triton "
            "was imported; set or unset it before the process imports triton"
        )
    a, b = a.detach().float(), b.detach().float()  # no copy when already float32: strides are passed as they are
    a3 = a if a.dim() == 3 else a.unsqueeze(0)  # (G, Ns, F), a view
    b3 = b if b.dim() == 3 else b.unsqueeze(0)  # (G, Nt, F), a view
    out3 = out if out.dim() == 3 else out.unsqueeze(0)  # (G, Ns, Nt), shares out's memory
    groups, ns, nf = a3.shape
    nt = b3.shape[1]
    grid = (triton.cdiv(ns, BLOCK_S), triton.cdiv(nt, BLOCK_T), groups)
    kernel = _kernel(interpret)
    with torch.cuda.device(out.device) if out.device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](
            a3, b3, out3,
            ns, nt, nf,
            *a3.stride(), *b3.stride(), *out3.stride(),
            BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F,
            num_warps=NUM_WARPS,
        )

