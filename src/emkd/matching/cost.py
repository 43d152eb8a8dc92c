"""Matching costs between two token sets (EM-KD Eq. 2)."""

from __future__ import annotations

import torch


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
