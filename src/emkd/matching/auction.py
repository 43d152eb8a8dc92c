"""Batched minimum-cost rectangular assignment by the auction algorithm, in PyTorch, on any device.

The solver is Bertsekas' auction algorithm with ε-scaling [1]. Student rows are the bidders and teacher columns the
objects; the benefit of pairing row ``i`` with column ``j`` is ``a[i, j] = -C[i, j]``. Every round, all unassigned
rows of all samples bid at once (the synchronous "Jacobi" auction [2]): row ``i`` picks its best column ``j`` by
value ``a[i, j] - p[j]``, offers ``p[j] + (best - second best) + ε``, and each column goes to its highest bidder,
releasing its previous owner. ε is divided by 8 from phase to phase; a pair that breaks ε-complementary slackness
(ε-CS: ``a[i, j] - p[j] >= max_k (a[i, k] - p[k]) - ε``) at the new ε is released and bid for again.

With ``Ns < Nt`` some columns stay free, and the forward auction alone certifies nothing: a column priced in an early
phase and free at the end inflates the dual bound. So every phase ends with a reverse auction [3] (columns bid for
rows, also all at once): with ``λ`` the lowest price of an assigned column, every free column priced above ``λ``
either drops its price to ``λ`` or outbids for a row (raising that row's profit by at least ε), until every free
column is priced at most ``λ``. Doing this in every phase, not only the last, keeps the excess prices it has to
remove of the order of the previous ε; removed all at once at the final ε, they would take ``excess / ε`` rounds
(teacher tokens with identical costs trade a row back and forth, lowering their prices by ε each time).

Guarantee. At the end every row is assigned, every pair satisfies ε-CS, free columns are priced ``<= λ`` and
assigned ones ``>= λ``. Then ``p'[j] = max(p[j], λ) - λ`` and ``π'[i] = a[i, σ(i)] - p[σ(i)] + λ + ε`` are a feasible
dual solution whose value exceeds the assignment's benefit by exactly ``Ns * ε``, so

    total cost of the result  <=  optimal total cost + Ns * ε.

with ``Ns`` the sample's number of (valid) rows. The final ε is chosen per sample:

* default: ``ε = tol * (max C - min C) / Ns``, so the excess is at most ``tol`` times the sample's cost range
  (``tol = 1e-9``, far below the float32 rounding of the costs themselves), up to float64 rounding in the prices;
* integer-valued costs: ``ε`` need not go below ``2**-ceil(log2(Ns + 1)) < 1 / Ns``: the excess is then below 1,
  hence zero, and the result is an optimum. The default mode stops there for integer-valued samples, and
  ``exact=True`` demands integer costs (``|C| < 2**40``) and always uses that ε. Every ε is then a power of two and
  every price a dyadic rational, so float64 arithmetic is exact. For non-integer costs no ε derived from the
  entries certifies exactness: the smallest non-zero difference between two entries does not bound the smallest
  non-zero difference between two assignments' totals (sums of ``Ns`` entries), so ``exact`` refuses them. Costs
  on a grid of spacing ``δ`` can be divided by ``δ`` (and rounded) first.

Everything runs in float64 on the input's device; the host only learns, every ``check_every`` rounds, whether
bidding has ended (one synchronisation), and raises ``RuntimeError`` after ``max_rounds`` rounds in total.

[1] D. P. Bertsekas, "The auction algorithm: a distributed relaxation method for the assignment problem",
    Annals of Operations Research 14 (1988).
[2] D. P. Bertsekas and D. A. Castañon, "Parallel synchronous and asynchronous implementations of the auction
    algorithm", Parallel Computing 17 (1991).
[3] D. P. Bertsekas, D. A. Castañon and H. Tsaknakis, "Reverse auction and the solution of inequality constrained
    assignment problems", SIAM Journal on Optimization 3 (1993).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

EPS_FACTOR = 8.0  # ε is divided by this from one phase to the next
EXACT_MAX_ABS_COST = 2.0**40


@torch.no_grad()
def auction_assign(
    cost: torch.Tensor,
    sizes: torch.Tensor | None = None,
    *,
    tol: float = 1e-9,
    exact: bool = False,
    max_rounds: int = 50_000,
    check_every: int | None = None,
) -> torch.Tensor:
    """Minimum-cost assignment of every row to a distinct column, for a batch of padded cost matrices.

    Args:
        cost: ``[B, Ns, Nt]`` costs (any real dtype, ``Ns <= Nt``); no gradient flows.
        sizes: ``[B, 2]`` integer ``(ns_b, nt_b)`` per sample, ``0 <= ns_b <= nt_b``, ``ns_b <= Ns``, ``nt_b <= Nt``:
            sample ``b`` is ``cost[b, :ns_b, :nt_b]`` and the rest is padding, which is never read and never
            assigned. ``None`` means every sample is the full ``[Ns, Nt]``.
        tol: float mode: the result's total cost exceeds the optimum by at most ``tol * (max - min)`` of the
            sample's valid costs.
        exact: integer-valued costs only (``|C| < 2**40``); the result is an optimum.
        max_rounds: bound on the bidding rounds of all phases together.
        check_every: rounds between two checks (host synchronisations) for the end of a forward or reverse
            auction; rounds run after the end are no-ops. Default 1 on the CPU (checks are free), 4 elsewhere.

    Returns:
        ``[B, Ns]`` long on ``cost.device``: the column assigned to each row, ``-1`` for padding rows.

    Raises:
        ValueError: bad shapes or sizes, non-finite costs, non-integer costs with ``exact=True``.
        RuntimeError: the auction did not finish within ``max_rounds`` rounds.
    """
    if cost.dim() != 3:
        raise ValueError(f"auction_assign needs a [B, Ns, Nt] cost tensor, got shape {tuple(cost.shape)}")
    batch, n_rows, n_cols = cost.shape
    if n_rows > n_cols:
        raise ValueError(
            f"auction_assign needs Ns <= Nt (rows are assigned to distinct columns), got cost of shape "
            f"{tuple(cost.shape)}; pass the transpose"
        )
    if cost.is_complex() or cost.dtype == torch.bool:
        raise ValueError(f"auction_assign needs real costs, got dtype {cost.dtype}")
    if not tol > 0:
        raise ValueError(f"auction_assign: tol must be > 0, got {tol}")
    if max_rounds < 1:
        raise ValueError(f"auction_assign: max_rounds must be >= 1, got {max_rounds}")
    device = cost.device
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    if check_every < 1:
        raise ValueError(f"auction_assign: check_every must be >= 1, got {check_every}")
    row_counts, col_counts = _sizes(sizes, batch, n_rows, n_cols, device)
    if batch == 0 or n_rows == 0:
        return torch.full((batch, n_rows), -1, dtype=torch.long, device=device)

    rows = torch.arange(n_rows, device=device)
    cols = torch.arange(n_cols, device=device)
    row_valid = rows < row_counts[:, None]  # (B, Ns)
    col_valid = cols < col_counts[:, None]  # (B, Nt)
    valid = row_valid[:, :, None] & col_valid[:, None, :]  # (B, Ns, Nt)
    c = cost.detach().to(torch.float64)  # (B, Ns, Nt)
    bad = valid & ~torch.isfinite(c)
    if bad.any():
        b, i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"auction_assign: sample {b} has a non-finite cost at [{i}, {j}] ({float(c[b, i, j])})")
    c = torch.where(valid, c, 0.0)
    off_grid = c != c.round()  # (B, Ns, Nt), padding is 0
    too_large = c.abs() >= EXACT_MAX_ABS_COST
    integral = ~(off_grid | too_large).flatten(1).any(dim=1)  # (B,) samples that can be solved exactly
    if exact and not bool(integral.all()):
        b, i, j = (int(x) for x in (off_grid | too_large).nonzero()[0])
        raise ValueError(
            f"auction_assign(exact=True) needs integer-valued costs with |cost| < 2**40; sample {b} has "
            f"{float(c[b, i, j])!r} at [{i}, {j}]"
        )

    neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=device)
    c_max = torch.where(valid, c, neg_inf).amax(dim=(1, 2))  # (B,)
    c_min = torch.where(valid, c, -neg_inf).amin(dim=(1, 2))  # (B,)
    spread = torch.where(row_counts > 0, c_max - c_min, 0.0)  # (B,)
    eps_final = _final_eps(spread, row_counts, integral, tol, exact)  # (B,)
    # phases per sample: ε runs from about spread / 8 down to eps_final by factors of 8
    ratio = spread / EPS_FACTOR / eps_final
    phases = torch.ceil(torch.log(ratio) / math.log(EPS_FACTOR)).clamp(min=0)  # (B,)
    n_phases = int(phases.max()) + 1

    generator = torch.Generator(device=device).manual_seed(0)
    benefit = torch.where(valid, -c, neg_inf)  # (B, Ns, Nt)
    tie_key = torch.rand(n_rows, n_cols, generator=generator, device=device)  # (Ns, Nt)
    state = _Auction(
        benefit=benefit,
        benefit_t=benefit.transpose(1, 2).contiguous(),
        price=torch.zeros(batch, n_cols, dtype=torch.float64, device=device),
        profit=torch.zeros(batch, n_rows, dtype=torch.float64, device=device),
        col_of_row=torch.full((batch, n_rows + 1), -1, dtype=torch.long, device=device),
        row_of_col=torch.full((batch, n_cols + 1), -1, dtype=torch.long, device=device),
        row_valid=row_valid,
        col_valid=col_valid,
        tie_key=tie_key,
        tie_key_t=tie_key.T.contiguous(),
        rows=rows,
        cols=cols,
    )
    used = 0
    for phase in range(n_phases):
        eps = eps_final * EPS_FACTOR ** (phases - phase).clamp(min=0)  # (B,)
        state.release_violations(eps)
        used += _run_rounds(
            partial(state.forward_round, eps), state.unassigned_rows, used, max_rounds, check_every,
            f"forward auction of phase {phase + 1} of {n_phases}",
        )
        floor = state.start_reverse()  # (B,)
        used += _run_rounds(
            partial(state.reverse_round, eps, floor), partial(state.overpriced_free_columns, floor), used,
            max_rounds, check_every, f"reverse auction of phase {phase + 1} of {n_phases}",
        )
    return state.col_of_row[:, :n_rows].clone()


def _sizes(
    sizes: torch.Tensor | None, batch: int, n_rows: int, n_cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``sizes`` ``[B, 2]`` and return ``(row_counts [B], col_counts [B])`` long on ``device``."""
    if sizes is None:
        full = torch.ones(batch, dtype=torch.long, device=device)
        return full * n_rows, full * n_cols
    if sizes.shape != (batch, 2) or sizes.is_floating_point() or sizes.is_complex():
        raise ValueError(
            f"auction_assign: sizes must be an integer [B, 2] = [{batch}, 2] tensor of (ns, nt), got dtype "
            f"{sizes.dtype} and shape {tuple(sizes.shape)}"
        )
    s = sizes.to(device, torch.long)
    ns, nt = s[:, 0], s[:, 1]
    bad = (ns < 0) | (ns > nt) | (ns > n_rows) | (nt > n_cols)
    if bad.any():
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"auction_assign: sample {b} has sizes (ns, nt) = ({int(ns[b])}, {int(nt[b])}); need "
            f"0 <= ns <= nt, ns <= {n_rows}, nt <= {n_cols}"
        )
    return ns, nt


def _final_eps(
    spread: torch.Tensor, row_counts: torch.Tensor, integral: torch.Tensor, tol: float, exact: bool
) -> torch.Tensor:
    """Last-phase ε per sample ``[B]``: ``Ns * ε`` bounds the excess over the optimum (see the module docstring).

    Integer-valued samples never need ε below ``2**-ceil(log2(Ns + 1))`` (that one already gives the optimum), so
    the float mode stops there too; ``exact`` uses it whatever ``tol`` says.
    """
    n = row_counts.to(torch.float64)
    eps_exact = torch.exp2(-torch.ceil(torch.log2(n + 1.0)))
    if exact:
        return eps_exact
    eps = tol * spread / n.clamp(min=1.0)
    eps = torch.where(eps > 0, eps, 1.0)  # all costs equal: every assignment is optimal, any ε will do
    return torch.where(integral, torch.maximum(eps, eps_exact), eps)


def _best_and_second(
    value: torch.Tensor, tie_key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best entry of each row of ``value`` ``[B, R, K]``, where it is, and the best of the others.

    Returns ``(best, choice, second)``, each ``[B, R]``: exact ties for the best go to the largest ``tie_key``
    ``[R, K]``; ``second`` is the largest entry other than ``choice`` (``best`` again on a tie, ``-inf`` if ``K == 1``).
    """
    best = value.amax(dim=2)  # (B, R)
    choice = torch.where(value == best[:, :, None], tie_key, -1.0).argmax(dim=2)  # (B, R)
    second = value.scatter(2, choice[:, :, None], -math.inf).amax(dim=2)  # (B, R)
    return best, choice, second


def _run_rounds(
    step: Callable[[], None],
    pending: Callable[[], torch.Tensor],
    used: int,
    max_rounds: int,
    check_every: int,
    what: str,
) -> int:
    """Call ``step`` until ``pending()`` (a ``[B]`` bool tensor) is all False; return the number of rounds run.

    ``pending`` is read on the host once every ``check_every`` rounds; extra rounds after the end are no-ops.
    """
    rounds = 0
    while True:
        left = pending()  # (B,)
        if not bool(left.any()):
            return rounds
        if used + rounds >= max_rounds:
            samples = left.nonzero().flatten().tolist()
            raise RuntimeError(
                f"auction_assign did not converge: {what} still running after {max_rounds} bidding rounds in total "
                f"(samples {samples[:10]}{' ...' if len(samples) > 10 else ''} unfinished); raise max_rounds, or "
                f"check the costs for huge ranges"
            )
        for _ in range(min(check_every, max_rounds - used - rounds)):
            step()
            rounds += 1


@dataclass
class _Auction:
    """Prices and the partial assignment of a batch, updated in place by the rounds of the auction.

    ``benefit`` ``[B, Ns, Nt]`` is ``-cost`` on valid entries and ``-inf`` elsewhere (``benefit_t``: its transpose
    ``[B, Nt, Ns]``, contiguous, for the reverse rounds, which reduce over rows); ``price`` ``[B, Nt]``; ``profit``
    ``[B, Ns]`` (reverse phase only); ``col_of_row`` ``[B, Ns + 1]`` and ``row_of_col`` ``[B, Nt + 1]`` hold the
    partner or ``-1``, their last slot absorbing the scatters of rows / columns with nothing to write;
    ``row_valid`` ``[B, Ns]`` and ``col_valid`` ``[B, Nt]`` mark the real rows and columns; ``tie_key`` ``[Ns, Nt]``
    (and its transpose ``tie_key_t``) is random and breaks exact ties between columns (or rows), so that bidders
    spread out instead of all picking the lowest index; ``rows`` / ``cols`` are aranges.
    """

    benefit: torch.Tensor
    benefit_t: torch.Tensor
    price: torch.Tensor
    profit: torch.Tensor
    col_of_row: torch.Tensor
    row_of_col: torch.Tensor
    row_valid: torch.Tensor
    col_valid: torch.Tensor
    tie_key: torch.Tensor
    tie_key_t: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @property
    def n_rows(self) -> int:
        return self.benefit.shape[1]

    @property
    def n_cols(self) -> int:
        return self.benefit.shape[2]

    def unassigned_rows(self) -> torch.Tensor:
        """``[B]`` True where a valid row is still unassigned."""
        return ((self.col_of_row[:, : self.n_rows] < 0) & self.row_valid).any(dim=1)

    def release_violations(self, eps: torch.Tensor) -> None:
        """Unassign every row whose pair breaks ε-CS at the new ``eps`` ``[B]``."""
        value = self.benefit - self.price[:, None, :]  # (B, Ns, Nt)
        own = self.col_of_row[:, : self.n_rows]  # (B, Ns)
        own_value = value.gather(2, own.clamp(min=0)[:, :, None]).squeeze(2)  # (B, Ns)
        drop = (own >= 0) & (own_value < value.amax(dim=2) - eps[:, None])  # (B, Ns)
        self.row_of_col.scatter_(1, torch.where(drop, own, self.n_cols), -1)
        self.col_of_row[:, : self.n_rows] = torch.where(drop, -1, own)

    def forward_round(self, eps: torch.Tensor) -> None:
        """One Jacobi round: every unassigned row bids for its best column; each column takes its highest bid."""
        n_rows, n_cols = self.n_rows, self.n_cols
        value = self.benefit - self.price[:, None, :]  # (B, Ns, Nt)
        best, choice, second = _best_and_second(value, self.tie_key)  # (B, Ns) each
        second = torch.where(torch.isinf(second), best, second)  # a single valid column: bid the minimum step
        bidding = (self.col_of_row[:, :n_rows] < 0) & self.row_valid  # (B, Ns)
        bid = torch.where(bidding, self.price.gather(1, choice) + (best - second) + eps[:, None], -math.inf)
        top_bid = torch.full_like(self.price, -math.inf).scatter_reduce(1, choice, bid, "amax")  # (B, Nt)
        is_top = bidding & (bid == top_bid.gather(1, choice))  # (B, Ns)
        winner = torch.full_like(self.row_of_col[:, :n_cols], n_rows).scatter_reduce(
            1, choice, torch.where(is_top, self.rows, n_rows), "amin"
        )  # (B, Nt), lowest-index top bidder
        won = winner < n_rows  # (B, Nt)
        previous = self.row_of_col[:, :n_cols]  # (B, Nt)
        self.col_of_row.scatter_(1, torch.where(won & (previous >= 0), previous, n_rows), -1)
        self.col_of_row.scatter_(1, torch.where(won, winner, n_rows), self.cols.expand_as(winner))
        self.row_of_col[:, :n_cols] = torch.where(won, winner, previous)
        self.price.copy_(torch.where(won, top_bid, self.price))

    def start_reverse(self) -> torch.Tensor:
        """Set row profits ``a[i, σ(i)] - p[σ(i)]`` and return ``λ`` ``[B]``, the lowest price of an assigned column."""
        own = self.col_of_row[:, : self.n_rows].clamp(min=0)  # (B, Ns)
        own_benefit = self.benefit.gather(2, own[:, :, None]).squeeze(2)  # (B, Ns)
        # padding rows get +inf profit, so a column never values them (benefit - profit = -inf)
        self.profit = torch.where(self.row_valid, own_benefit - self.price.gather(1, own), math.inf)  # (B, Ns)
        assigned = self.row_of_col[:, : self.n_cols] >= 0  # (B, Nt)
        return torch.where(assigned, self.price, math.inf).amin(dim=1)  # (B,), inf for samples without rows

    def overpriced_free_columns(self, floor: torch.Tensor) -> torch.Tensor:
        """``[B]`` True where a valid free column is priced above ``floor`` ``[B]``."""
        return self._overpriced(floor).any(dim=1)

    def _overpriced(self, floor: torch.Tensor) -> torch.Tensor:
        free = (self.row_of_col[:, : self.n_cols] < 0) & self.col_valid  # (B, Nt)
        return free & (self.price > floor[:, None])

    def reverse_round(self, eps: torch.Tensor, floor: torch.Tensor) -> None:
        """One Jacobi reverse round: every free column priced above ``floor`` ``[B]`` drops to it or bids for a row.

        Column ``j`` values row ``i`` at ``a[i, j] - profit[i]``; with best ``β`` (row ``r``) and second ``ω``: if
        ``floor >= β - ε`` its price becomes ``floor``, else it offers ``r`` the profit ``a[r, j] - max(floor, ω - ε)``
        (at least ``profit[r] + ε``). Each row takes its best offer and frees its old column, whose price stays.
        """
        n_rows, n_cols = self.n_rows, self.n_cols
        active = self._overpriced(floor)  # (B, Nt)
        value = self.benefit_t - self.profit[:, None, :]  # (B, Nt, Ns)
        best, choice, second = _best_and_second(value, self.tie_key_t)  # (B, Nt) each
        settle = active & (floor[:, None] >= best - eps[:, None])  # (B, Nt)
        bidding = active & ~settle
        new_price = torch.maximum(floor[:, None], second - eps[:, None])  # (B, Nt)
        chosen_benefit = self.benefit_t.gather(2, choice[:, :, None]).squeeze(2)  # (B, Nt)
        offer = torch.where(bidding, chosen_benefit - new_price, -math.inf)  # (B, Nt)
        top_offer = torch.full_like(self.profit, -math.inf).scatter_reduce(1, choice, offer, "amax")  # (B, Ns)
        is_top = bidding & (offer == top_offer.gather(1, choice))  # (B, Nt)
        winner = torch.full_like(self.col_of_row[:, :n_rows], n_cols).scatter_reduce(
            1, choice, torch.where(is_top, self.cols, n_cols), "amin"
        )  # (B, Ns), lowest-index top offer
        won = winner < n_cols  # (B, Ns)
        old = self.col_of_row[:, :n_rows]  # (B, Ns)
        self.row_of_col.scatter_(1, torch.where(won, old, n_cols), -1)
        self.row_of_col.scatter_(1, torch.where(won, winner, n_cols), self.rows.expand_as(winner))
        self.col_of_row[:, :n_rows] = torch.where(won, winner, old)
        accepted = self.row_of_col[:, :n_cols] >= 0  # (B, Nt)
        newly = accepted & active  # (B, Nt), the winning columns
        self.price.copy_(torch.where(newly, new_price, torch.where(settle, floor[:, None], self.price)))
        self.profit = torch.where(won, top_offer, self.profit)
