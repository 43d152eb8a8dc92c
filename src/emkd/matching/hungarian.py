"""Minimum-cost one-to-one assignment between student and teacher vision tokens (EM-KD Eq. 1)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@torch.no_grad()
def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the rectangular linear assignment problem on ``cost`` with SciPy (on the CPU, no gradient).

    Args:
        cost: ``[Ns, Nt]`` cost of pairing student token ``i`` with teacher token ``j``.

    Returns:
        ``(idx_s, idx_t)``, two ``[M]`` LongTensors on ``cost.device`` with ``M = min(Ns, Nt)``, sorted by ``idx_s``;
        every index is used at most once and ``cost[idx_s, idx_t].sum()`` is minimal.
    """
    if cost.dim() != 2:
        raise ValueError(f"hungarian_match needs a [Ns, Nt] cost matrix, got shape {tuple(cost.shape)}")
    device = cost.device
    if cost.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError(f"hungarian_match: cost matrix of shape {c.shape} has non-finite entries")
    rows, cols = linear_sum_assignment(c)
    order = np.argsort(rows, kind="stable")
    idx_s = torch.from_numpy(rows[order].astype(np.int64)).to(device)
    idx_t = torch.from_numpy(cols[order].astype(np.int64)).to(device)
    return idx_s, idx_t
