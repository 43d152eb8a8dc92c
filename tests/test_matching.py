"""``emkd.hungarian_match`` and ``emkd.l1_cost`` (SPEC §2) against brute force and naive loops."""

from __future__ import annotations

import itertools

import pytest
import torch

import emkd
from emkd.matching.hungarian import hungarian_match, hungarian_match_batch


def brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over every one-to-one assignment of ``min(Ns, Nt)`` pairs (itertools.permutations)."""
    ns, nt = cost.shape
    c = cost.double()
    if ns <= nt:
        return min(float(sum(c[i, j] for i, j in enumerate(cols))) for cols in itertools.permutations(range(nt), ns))
    return min(float(sum(c[i, j] for j, i in enumerate(rows))) for rows in itertools.permutations(range(ns), nt))


def check_assignment(cost: torch.Tensor, idx_s: torch.Tensor, idx_t: torch.Tensor) -> None:
    ns, nt = cost.shape
    m = min(ns, nt)
    assert idx_s.dtype == torch.long and idx_t.dtype == torch.long
    assert idx_s.shape == (m,) and idx_t.shape == (m,)
    assert idx_s.tolist() == sorted(idx_s.tolist()), "not sorted by idx_s"
    assert len(set(idx_s.tolist())) == m and len(set(idx_t.tolist())) == m, "an index is used twice"
    assert all(0 <= i < ns for i in idx_s.tolist()) and all(0 <= j < nt for j in idx_t.tolist())


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (3, 3), (2, 6), (6, 2), (4, 7), (7, 4), (5, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_equals_brute_force(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(shape, generator=gen) * 10 - 3  # negative entries allowed
    idx_s, idx_t = emkd.hungarian_match(cost)
    check_assignment(cost, idx_s, idx_t)
    total = float(cost.double()[idx_s, idx_t].sum())
    assert total == pytest.approx(brute_force_min(cost), rel=1e-12, abs=1e-9)


def test_hungarian_known_answer():
    # Row 0 prefers column 2 and row 1 prefers column 0; column 1 is too expensive for both.
    cost = torch.tensor([[5.0, 9.0, 1.0], [2.0, 8.0, 7.0]])
    idx_s, idx_t = emkd.hungarian_match(cost)
    assert idx_s.tolist() == [0, 1] and idx_t.tolist() == [2, 0]
    # Transposed (more students than teachers): student 2 and student 0 take the two teacher tokens.
    idx_s, idx_t = emkd.hungarian_match(cost.T.contiguous())
    assert idx_s.tolist() == [0, 2] and idx_t.tolist() == [1, 0]


def test_hungarian_sorted_by_student_index_when_solution_is_a_permutation():
    # The optimum is the anti-diagonal: the output must list pairs by student index, not by teacher index.
    cost = torch.full((4, 4), 10.0)
    for i in range(4):
        cost[i, 3 - i] = 0.0
    idx_s, idx_t = emkd.hungarian_match(cost)
    assert idx_s.tolist() == [0, 1, 2, 3] and idx_t.tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (3, 0)])
def test_hungarian_empty_cost(shape):
    idx_s, idx_t = emkd.hungarian_match(torch.zeros(shape))
    assert idx_s.shape == (0,) and idx_t.shape == (0,)
    assert idx_s.dtype == torch.long and idx_t.dtype == torch.long


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_hungarian_non_finite_cost_raises(bad):
    cost = torch.rand(3, 4)
    cost[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        emkd.hungarian_match(cost)


def test_hungarian_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[Ns, Nt\]"):
        emkd.hungarian_match(torch.rand(2, 3, 4))


def test_hungarian_float64_and_grad_input():
    cost = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    idx_s, idx_t = emkd.hungarian_match(cost)
    check_assignment(cost.detach(), idx_s, idx_t)
    assert float(cost.detach()[idx_s, idx_t].sum()) == pytest.approx(brute_force_min(cost.detach()), rel=1e-12)


# ---- l1_cost --------------------------------------------------------------------------------------------------------
def naive_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = sum(abs(float(a[i, f]) - float(b[j, f])) for f in range(a.shape[1]))
    return out


@pytest.mark.parametrize(("ns", "nt", "f"), [(1, 1, 1), (3, 7, 37), (7, 3, 53), (5, 5, 16)])
def test_l1_cost_equals_naive(ns, nt, f):
    gen = torch.Generator().manual_seed(ns * 100 + nt)
    a = torch.randn(ns, f, generator=gen) * 3
    b = torch.randn(nt, f, generator=gen) * 3
    cost = emkd.l1_cost(a, b)
    assert cost.shape == (ns, nt) and cost.dtype == torch.float32
    torch.testing.assert_close(cost.double(), naive_l1(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 1000])
def test_l1_cost_chunking_is_invisible(chunk_size):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 37, generator=gen)
    b = torch.randn(6, 37, generator=gen)
    torch.testing.assert_close(emkd.l1_cost(a, b, chunk_size=chunk_size).double(), naive_l1(a, b), rtol=1e-5, atol=1e-5)


def test_l1_cost_has_no_gradient():
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    cost = emkd.l1_cost(a, b)
    assert not cost.requires_grad and cost.grad_fn is None


def test_l1_cost_shape_errors():
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(4, 9\)"):
        emkd.l1_cost(torch.zeros(3, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError):
        emkd.l1_cost(torch.zeros(3), torch.zeros(4, 3))


def test_l1_cost_then_hungarian_recovers_a_shuffle():
    """Teacher rows are the student rows shuffled (plus extra teacher rows): the match undoes the shuffle."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(5, 20, generator=gen)
    perm = torch.randperm(8, generator=gen)
    b = torch.cat([a, torch.randn(3, 20, generator=gen) + 10.0])[perm]  # teacher row perm^-1[i] is student row i
    idx_s, idx_t = emkd.hungarian_match(emkd.l1_cost(a, b))
    assert idx_s.tolist() == list(range(5))
    assert perm[idx_t].tolist() == list(range(5))


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_hungarian_match_batch_of_one_shape_equals_one_by_one(shape):
    # the batch path copies every cost to the host at once; the answers are the single-matrix ones
    costs = list(torch.rand(6, *shape, generator=torch.Generator().manual_seed(sum(shape))))
    batch = hungarian_match_batch(costs)
    for cost, (idx_s, idx_t) in zip(costs, batch):
        single_s, single_t = hungarian_match(cost)
        check_assignment(cost, idx_s, idx_t)
        assert torch.equal(idx_s, single_s) and torch.equal(idx_t, single_t)
    costs[2] = costs[2].clone()
    costs[2][1, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"cost 2 of shape \({shape[0]}, {shape[1]}\) has non-finite entries"):
        hungarian_match_batch(costs)


def test_hungarian_match_batch_of_mixed_shapes_and_empty_costs():
    costs = [torch.rand(2, 3), torch.rand(0, 4), torch.rand(3, 2)]
    out = hungarian_match_batch(costs)
    assert [tuple(idx_s.shape) for idx_s, _ in out] == [(2,), (0,), (2,)]
    for cost, (idx_s, idx_t) in zip(costs, out):
        assert [t.tolist() for t in hungarian_match(cost)] == [idx_s.tolist(), idx_t.tolist()]
