"""Minimum-cost one-to-one assignment between student and teacher vision tokens (EM-KD Eq. 1).

Two backends solve the same problem. ``"scipy"`` runs ``scipy.optimize.linear_sum_assignment`` on the CPU, one sample
at a time, and returns an optimum. ``"auction"`` (:func:`emkd.matching.auction.auction_assign`) stays on the cost's
device and solves a whole batch at once; its total cost is within ``1e-9`` times the sample's cost range of the
optimum (the optimum itself for integer-valued costs). ``"auto"`` is SciPy: on this project's CPU measurements the
auction is 180-450x slower than SciPy (``benchmarks/matching_bench.py``), and it has not been timed on a GPU, where
a batch of two 144 x 729 problems takes about 240 rounds of small kernels against a 0.4 MB copy to the host for
SciPy. Choose ``"auction"`` explicitly for large batches on a GPU, after measuring: the losses take it as
``assignment="auction"`` (a recipe's ``loss.assignment``).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from emkd.matching.auction import auction_assign

BACKENDS = ("scipy", "auction", "auto")


@torch.no_grad()
def hungarian_match(cost: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the rectangular linear assignment problem on ``cost`` (no gradient).

    Args:
        cost: ``[Ns, Nt]`` cost of pairing student token ``i`` with teacher token ``j``.
        backend: ``"scipy"``, ``"auction"`` or ``"auto"`` (SciPy; see the module docstring).

    Returns:
        ``(idx_s, idx_t)``, two ``[M]`` LongTensors on ``cost.device`` with ``M = min(Ns, Nt)``, sorted by ``idx_s``;
        every index is used at most once and ``cost[idx_s, idx_t].sum()`` is minimal (for the auction: see the
        module docstring).
    """
    if cost.dim() != 2:
        raise ValueError(f"hungarian_match needs a [Ns, Nt] cost matrix, got shape {tuple(cost.shape)}")
    if _resolve(backend, [cost]) == "auction":
        return _auction_pairs([cost], "hungarian_match")[0]
    device = cost.device
    if cost.numel() == 0:
        return _empty_pair(device)
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError(f"hungarian_match: cost matrix of shape {c.shape} has non-finite entries")
    rows, cols = linear_sum_assignment(c)
    order = np.argsort(rows, kind="stable")
    idx_s = torch.from_numpy(rows[order].astype(np.int64)).to(device)
    idx_t = torch.from_numpy(cols[order].astype(np.int64)).to(device)
    return idx_s, idx_t


@torch.no_grad()
def hungarian_match_batch(
    costs: list[torch.Tensor], backend: str = "auto"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`hungarian_match` on every cost matrix of a batch; the auction backend solves them in one batched call.

    Args:
        costs: ``B`` cost matrices ``[Ns_b, Nt_b]`` of any shapes (either side may be the longer, or empty), on one
            device for the auction backend.
        backend: ``"scipy"``, ``"auction"`` or ``"auto"`` (SciPy; see the module docstring).

    Returns:
        ``B`` pairs ``(idx_s, idx_t)``, as :func:`hungarian_match` returns them for each cost.
    """
    for b, cost in enumerate(costs):
        if cost.dim() != 2:
            raise ValueError(
                f"hungarian_match_batch: cost {b} must be a [Ns, Nt] matrix, got shape {tuple(cost.shape)}"
            )
    if _resolve(backend, costs) == "auction":
        return _auction_pairs(costs, "hungarian_match_batch")
    shapes = {tuple(cost.shape) for cost in costs}
    if len(shapes) != 1 or 0 in next(iter(shapes)) or len({cost.device for cost in costs}) != 1:
        return [hungarian_match(cost, backend="scipy") for cost in costs]
    # one shape (a group of fixed-size images): one copy to the host and one check for all, then SciPy per matrix
    c = torch.stack(costs).to("cpu", torch.float64).numpy()  # (B, Ns, Nt)
    finite = np.isfinite(c).reshape(len(costs), -1).all(axis=1)  # (B,)
    if not finite.all():
        b = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"hungarian_match_batch: cost {b} of shape {tuple(costs[b].shape)} has non-finite entries")
    solved = [linear_sum_assignment(m) for m in c]  # SciPy returns the rows sorted
    rows = torch.from_numpy(np.stack([r for r, _ in solved]).astype(np.int64)).to(costs[0].device)  # (B, M)
    cols = torch.from_numpy(np.stack([k for _, k in solved]).astype(np.int64)).to(costs[0].device)  # (B, M)
    return list(zip(rows.unbind(0), cols.unbind(0)))


def _resolve(backend: str, costs: list[torch.Tensor]) -> str:
    """``"scipy"`` or ``"auction"`` for ``backend`` and the device of ``costs``."""
    if backend not in BACKENDS:
        raise ValueError(f"hungarian_match: backend must be one of {BACKENDS}, got {backend!r}")
    return "scipy" if backend == "auto" else backend


def _auction_pairs(costs: list[torch.Tensor], caller: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Solve every ``[Ns_b, Nt_b]`` cost with one :func:`auction_assign` call on a padded ``[B', max rows, max cols]``.

    A cost with more students than teachers is solved transposed (teachers bid), so every solved matrix has rows
    ``<=`` columns; empty costs are skipped. Padding is excluded through ``sizes``, not through large costs: padded
    rows never bid and padded columns are never offered, so they cannot change any sample's optimum.
    """
    devices = {cost.device for cost in costs}
    if len(devices) > 1:
        raise ValueError(
            f"{caller}: the auction backend needs every cost on one device, got {sorted(map(str, devices))}"
        )
    solved = [b for b, cost in enumerate(costs) if cost.numel() > 0]
    flipped = [costs[b].shape[0] > costs[b].shape[1] for b in solved]
    mats = [(costs[b].T if flip else costs[b]).detach() for b, flip in zip(solved, flipped)]  # (n_k, m_k), n_k <= m_k
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if mats:
        device = mats[0].device
        n_rows = max(mat.shape[0] for mat in mats)
        n_cols = max(mat.shape[1] for mat in mats)
        padded = torch.zeros(len(mats), n_rows, n_cols, dtype=torch.float64, device=device)  # (B', Ns, Nt)
        for k, mat in enumerate(mats):
            padded[k, : mat.shape[0], : mat.shape[1]] = mat
        finite = torch.isfinite(padded).flatten(1).all(dim=1)  # (B',)
        if not bool(finite.all()):
            b = solved[int((~finite).nonzero()[0, 0])]
            raise ValueError(f"{caller}: cost {b} of shape {tuple(costs[b].shape)} has non-finite entries")
        sizes = torch.tensor([tuple(mat.shape) for mat in mats], dtype=torch.long, device=device)  # (B', 2)
        assignment = auction_assign(padded, sizes)  # (B', Ns)
        for k, (b, flip, mat) in enumerate(zip(solved, flipped, mats)):
            rows = torch.arange(mat.shape[0], device=device)  # (n_k,)
            cols = assignment[k, : mat.shape[0]].clone()  # (n_k,)
            if flip:  # teachers were the bidders: list the students they won, in order
                order = torch.argsort(cols)
                rows, cols = cols[order], rows[order]
            results[b] = (rows, cols)
    return [results[b] if b in results else _empty_pair(cost.device) for b, cost in enumerate(costs)]


def _empty_pair(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_s, idx_t)`` of a cost matrix with no rows or no columns: two empty LongTensors."""
    return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.long, device=device)
