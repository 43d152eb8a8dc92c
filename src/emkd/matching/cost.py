"""Matching costs between two token sets (EM-KD Eq. 2): on given rows (`l1_cost`), or on logits computed chunk by
chunk from hidden states and LM heads (`head_l1_cost`).

Both sum ``|a - b|`` with a backend of :mod:`emkd.matching.l1_kernels`: ``"auto"`` (the default) takes the numba
kernel on CPU tensors when numba is installed (``emkd[fast]``) and ``torch.cdist(p=1)``, the reference, otherwise.
``head_l1_cost(..., matching_dtype="bfloat16")`` computes the no-gradient logits behind the cost from bfloat16
hidden states and heads (opt-in: docs/performance.md section 5 gives what it changes in the matches).

Neither loop over chunks synchronises with the device (no ``.item()``, ``bool(tensor)`` or data-dependent indexing;
``tests/test_host_sync.py``): the matching waits for the device only in the assignment that follows (SciPy's copy of
the finished cost to the host).
"""

from __future__ import annotations

import torch

from emkd.chunking import chunk_logits, resolve_chunk_size, vocab_chunks
from emkd.matching.l1_kernels import l1_accumulate, resolve_backend

MATCHING_DTYPES = ("float32", "bfloat16")


@torch.no_grad()
def l1_cost(a: torch.Tensor, b: torch.Tensor, chunk_size: int = 8192, backend: str = "auto") -> torch.Tensor:
    """Manhattan distance between every row of ``a`` and every row of ``b``.

    Args:
        a: ``[Ns, F]`` (student rows).
        b: ``[Nt, F]`` (teacher rows).
        chunk_size: features summed per step, so no ``Ns x Nt x F`` tensor ever exists (and, for the numba kernel,
            so that a tile's rows stay in cache).
        backend: ``"auto"`` | ``"cdist"`` | ``"numba"`` | ``"triton"`` (:mod:`emkd.matching.l1_kernels`).

    Returns:
        ``[Ns, Nt]`` float32 cost, ``C[i, j] = sum_f |a[i, f] - b[j, f]|``, without gradient.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"l1_cost needs a [Ns, F] and b [Nt, F], got {tuple(a.shape)} and {tuple(b.shape)}")
    backend = resolve_backend(backend, a, b)
    a = a.detach().float()
    b = b.detach().float()
    cost = a.new_zeros(a.shape[0], b.shape[0])  # (Ns, Nt)
    for start in range(0, a.shape[1], chunk_size):
        l1_accumulate(a[:, start : start + chunk_size], b[:, start : start + chunk_size], cost, backend)
    return cost


@torch.no_grad()
def head_l1_cost(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    chunk_size: int | None = None,
    backend: str = "auto",
    matching_dtype: str = "float32",
    keep_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Manhattan distance between the logits of every student row and every teacher row (EM-KD Eq. 2).

    Args:
        hs: ``[Ns, Ds]`` student rows, ``ws`` ``[V, Ds]``, ``bs`` ``[V]``; ``ht`` ``[Nt, Dt]``, ``wt`` ``[V, Dt]``, ``bt``.
            A leading batch dimension (``[G, Ns, Ds]`` and ``[G, Nt, Dt]``) computes ``G`` samples at once.
        chunk_size: vocabulary rows per chunk; ``None``: :func:`emkd.chunking.default_chunk_size` of ``hs``'s device.
        backend: ``"auto"`` | ``"cdist"`` | ``"numba"`` | ``"triton"`` (:mod:`emkd.matching.l1_kernels`).
        matching_dtype: ``"float32"`` (default: logits as the losses see them) or ``"bfloat16"``: each chunk's logits
            are ``h.bfloat16() @ W.bfloat16().T`` (bfloat16 products, rounded to bfloat16), plus the bias, then summed
            in float32. Faster on CPUs with bfloat16 matrix units; the costs move by about 1e-3 relative, which can
            swap near-tied matches (docs/performance.md section 5).
        keep_logits: also return the logits the cost was summed from, ``(z_s [[G,] Ns, V], z_t [[G,] Nt, V])``
            float32 without gradient, when the whole vocabulary was one chunk (``V <= chunk_size``: they existed at
            once anyway) and the matching dtype is float32; ``None`` in their place otherwise.

    Returns:
        ``[Ns, Nt]`` (or ``[G, Ns, Nt]``) float32, ``C[i, j] = sum_v |z_s[i, v] - z_t[j, v]|``, without gradient;
        no more than ``G (Ns + Nt) x chunk_size`` logits exist at once. With ``keep_logits``: ``(cost, logits)``.
    """
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"head_l1_cost: vocabulary sizes differ, student V={ws.shape[0]}, teacher V={wt.shape[0]}")
    if hs.dim() != ht.dim() or hs.shape[:-2] != ht.shape[:-2]:
        raise ValueError(f"head_l1_cost: student rows {tuple(hs.shape)} and teacher rows {tuple(ht.shape)} do not pair")
    if matching_dtype not in MATCHING_DTYPES:
        raise ValueError(f"head_l1_cost: matching_dtype must be one of {MATCHING_DTYPES}, got {matching_dtype!r}")
    backend = resolve_backend(backend, hs, ht)
    chunk_size = resolve_chunk_size(chunk_size, hs.device)
    if matching_dtype == "bfloat16":
        hs_m, ht_m = hs.detach().bfloat16(), ht.detach().bfloat16()
    else:
        hs_m, ht_m = hs.detach().float(), ht.detach().float()
    ws, wt = ws.detach(), wt.detach()
    bs = None if bs is None else bs.detach()
    bt = None if bt is None else bt.detach()
    cost = torch.zeros(*hs.shape[:-1], ht.shape[-2], device=hs.device)  # ([G,] Ns, Nt) float32
    zs = zt = None
    for start, stop in vocab_chunks(ws.shape[0], chunk_size):
        zs = _matching_logits(hs_m, ws, bs, start, stop)  # ([G,] Ns, C) float32
        zt = _matching_logits(ht_m, wt, bt, start, stop)  # ([G,] Nt, C) float32
        l1_accumulate(zs, zt, cost, backend)
    if not keep_logits:
        return cost
    whole = ws.shape[0] <= chunk_size and matching_dtype == "float32" and zs is not None
    return cost, ((zs, zt) if whole else None)


def _matching_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Float32 logits of vocabulary rows ``start:stop``, computed in ``h``'s dtype (float32 or bfloat16)."""
    if h.dtype == torch.float32:
        return chunk_logits(h, w, b, start, stop)
    z = (h @ w[start:stop].to(h.dtype).T).float()  # ([G,] N, C)
    if b is not None:
        z += b[start:stop].float()
    return z
