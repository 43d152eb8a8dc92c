"""Matching costs between two token sets (EM-KD Eq. 2): on given rows (`l1_cost`), or on logits computed chunk by
chunk from hidden states and LM heads (`head_l1_cost`)."""

from __future__ import annotations

import torch

from emkd.chunking import DEFAULT_CHUNK_SIZE, chunk_logits


@torch.no_grad()
def l1_cost(a: torch.Tensor, b: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Manhattan distance between every row of ``a`` and every row of ``b``.

    Args:
        a: ``[Ns, F]`` (student rows).
        b: ``[Nt, F]`` (teacher rows).
        chunk_size: features summed per step, so no ``Ns x Nt x F`` tensor ever exists.

    Returns:
        ``[Ns, Nt]`` float32 cost, ``C[i, j] = sum_f |a[i, f] - b[j, f]|``, without gradient.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"l1_cost needs a [Ns, F] and b [Nt, F], got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().float()
    b = b.detach().float()
    cost = a.new_zeros(a.shape[0], b.shape[0])  # (Ns, Nt)
    for start in range(0, a.shape[1], chunk_size):
        cost += torch.cdist(a[:, start : start + chunk_size], b[:, start : start + chunk_size], p=1.0)
    return cost


@torch.no_grad()
def head_l1_cost(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    wt: torch.Tensor,
    bt: torch.Tensor | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Manhattan distance between the logits of every student row and every teacher row (EM-KD Eq. 2).

    Args:
        hs: ``[Ns, Ds]`` student rows, ``ws`` ``[V, Ds]``, ``bs`` ``[V]``; ``ht`` ``[Nt, Dt]``, ``wt`` ``[V, Dt]``, ``bt``.
            A leading batch dimension (``[G, Ns, Ds]`` and ``[G, Nt, Dt]``) computes ``G`` samples at once.

    Returns:
        ``[Ns, Nt]`` (or ``[G, Ns, Nt]``) float32, ``C[i, j] = sum_v |z_s[i, v] - z_t[j, v]|``, without gradient;
        no more than ``G (Ns + Nt) x chunk_size`` logits exist at once.
    """
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"head_l1_cost: vocabulary sizes differ, student V={ws.shape[0]}, teacher V={wt.shape[0]}")
    hs32, ht32 = hs.detach().float(), ht.detach().float()
    if hs.dim() != ht.dim() or hs.shape[:-2] != ht.shape[:-2]:
        raise ValueError(f"head_l1_cost: student rows {tuple(hs.shape)} and teacher rows {tuple(ht.shape)} do not pair")
    cost = hs32.new_zeros(*hs.shape[:-1], ht.shape[-2])  # ([G,] Ns, Nt)
    for start in range(0, ws.shape[0], chunk_size):
        stop = min(start + chunk_size, ws.shape[0])
        zs = chunk_logits(hs32, ws.detach(), None if bs is None else bs.detach(), start, stop)  # ([G,] Ns, C)
        zt = chunk_logits(ht32, wt.detach(), None if bt is None else bt.detach(), start, stop)  # ([G,] Nt, C)
        cost += torch.cdist(zs, zt, p=1.0)
    return cost
