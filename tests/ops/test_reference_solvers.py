"""The reference's plain solvers (moespec.reference.solvers) against brute force and
against the fast path's solvers (moespec.ops.balanced_assignment, moespec.ops.sinkhorn).

Balanced assignment: the reference is checked to be the lexicographically smallest optimum by
enumerating every assignment (exact sums in Fractions), then the fast solver must return the
very same assignment, ties included. Sinkhorn: the two plans agree and select the same top-k.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from moespec.common.select import stable_topk
from moespec.ops.balanced_assignment import solve_balanced_assignment
from moespec.ops.sinkhorn import sinkhorn_plan as fast_sinkhorn_plan
from moespec.reference.solvers import balanced_assignment, expert_capacities, hungarian, sinkhorn_plan


def brute_force_lexmin(a_TE: torch.Tensor) -> list[int]:
    """The first assignment, in lexicographic order, with the best total (exact sums) among
    all with |{t : e_t = e}| = T // E + [e < T mod E]."""
    n_tok, n_exp = a_TE.shape
    cap = [n_tok // n_exp + (e < n_tok % n_exp) for e in range(n_exp)]
    a = [[Fraction(v) for v in row] for row in a_TE.double().tolist()]
    best, arg = None, None
    for combo in itertools.product(range(n_exp), repeat=n_tok):  # lexicographic order
        if [combo.count(e) for e in range(n_exp)] != cap:
            continue
        total = sum(a[t][e] for t, e in enumerate(combo))
        if best is None or total > best:
            best, arg = total, list(combo)
    return arg


def affinities(n_tok: int, n_exp: int, case: str, seed: int) -> torch.Tensor:
    """float64 [T, E] affinities of one kind: random, skewed, tied, alike or coarse."""
    a = torch.randn(n_tok, n_exp, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if case == "skewed":  # every token prefers expert 0
        a[:, 0] += 5.0
    elif case == "tied":  # many exact ties
        a = a.round()
    elif case == "alike":  # identical tokens: every balanced assignment is optimal
        a = a[:1].expand(n_tok, n_exp).clone()
    elif case == "coarse":  # few values, ties inside rows and across them
        a = (a > 0).double()
    return a


CASES = ["random", "skewed", "tied", "alike", "coarse"]
TINY = [(1, 1), (1, 3), (2, 4), (3, 2), (5, 2), (6, 3), (7, 3), (6, 4), (8, 2), (4, 4)]


# --- balanced assignment ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t,e", TINY)
def test_reference_assignment_is_the_lexmin_optimum(t, e, case):
    a = affinities(t, e, case, seed=10 * t + e)
    assert balanced_assignment(a).tolist() == brute_force_lexmin(a)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("t,e", [*TINY, (10, 4), (33, 5), (64, 4), (64, 8), (100, 7)])
def test_fast_solver_returns_the_reference_assignment(t, e, case):
    a = affinities(t, e, case, seed=100 * t + e)
    ref = balanced_assignment(a)
    assert torch.bincount(ref, minlength=e).tolist() == expert_capacities(t, e)
    assert torch.equal(solve_balanced_assignment(a), ref)
    assert torch.equal(solve_balanced_assignment(a.float()), balanced_assignment(a.float()))


def test_assignment_nonfinite_empty_and_no_binding_capacity():
    a = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a[3, 2], a[5, 0], a[6, 1] = float("nan"), float("inf"), -float("inf")
    floor = a[a.isfinite()].min()
    clean = torch.where(a.isfinite(), a, floor)  # non-finite counts as the smallest finite
    assert torch.equal(balanced_assignment(a), balanced_assignment(clean))
    assert torch.equal(solve_balanced_assignment(a), balanced_assignment(a))
    assert balanced_assignment(torch.empty(0, 4)).shape == (0,)
    # T <= E with distinct argmaxes: the balanced optimum is the argmax (ties to the lower index).
    a = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 0.0, 3.0]])
    assert balanced_assignment(a).tolist() == [1, 0]


def test_hungarian_against_brute_force():
    gen = torch.Generator().manual_seed(2)
    for n in range(1, 6):
        cost = torch.randint(-5, 6, (n, n), generator=gen).tolist()
        best = min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        col = hungarian(cost)
        assert sorted(col) == list(range(n))
        assert sum(cost[i][col[i]] for i in range(n)) == best


# --- Sinkhorn --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t,e,iterations,tol",
    [
        (40, 5, 2000, 1e-5),
        (64, 4, 100, 1e-4),
        (7, 3, 1, 0.0),
        (16, 4, 3, 0.0),
        (1, 4, 100, 1e-4),
        (5, 8, 50, 1e-3),
    ],
)
@pytest.mark.parametrize("case", ["random", "skewed", "huge"])
def test_reference_sinkhorn_matches_the_fast_plan(t, e, iterations, tol, case):
    z = torch.randn(t, e, generator=torch.Generator().manual_seed(t * e))
    if case == "skewed":
        z[:, 0] += 4.0
    elif case == "huge":
        z = 100.0 * z  # exp overflows without the max shift
    ref = sinkhorn_plan(z, iterations, tol)
    assert ref.dtype == torch.float32 and ref.isfinite().all() and not ref.requires_grad
    torch.testing.assert_close(ref, fast_sinkhorn_plan(z, iterations, tol), atol=1e-7, rtol=1e-5)
    for k in range(1, e + 1):
        assert torch.equal(stable_topk(ref, k), torch.ops.moespec.sinkhorn_topk(z, k, iterations, tol))


def test_reference_sinkhorn_balances_and_stops():
    z = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = sinkhorn_plan(z, iterations=2000, tol=1e-6)
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 1 / 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((40,), 1 / 40), atol=1e-5, rtol=1e-3)
    # One round: rows scaled once, then columns once, from d1 = 1.
    c = torch.exp(z.float() - z.float().max())
    d0 = (1 / 40) / (c.sum(1) + 1e-8)
    d1 = (1 / 5) / ((d0[:, None] * c).sum(0) + 1e-8)
    torch.testing.assert_close(sinkhorn_plan(z, 1, 0.0), d0[:, None] * c * d1)
    assert torch.equal(sinkhorn_plan(z, 50, 1e-3), sinkhorn_plan(z, 5000, 1e-3))
    assert sinkhorn_plan(torch.empty(0, 3), 10, 1e-4).shape == (0, 3)


@pytest.mark.parametrize("case", ["random", "skewed", "quantised"])
def test_auction_warm_start_changes_nothing(case, monkeypatch):
    """The auction only warm-starts the exact solver: with it and without it (zero prices,
    the plain argmax start) the assignment is the same, ties included."""
    from moespec.ops import balanced_assignment as ba

    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, 12, generator=g)
    if case == "skewed":  # every token prefers expert 2
        a[:, 2] += 4.0
    if case == "quantised":
        a = (a * 2).round() / 2
    warm = solve_balanced_assignment(a)
    monkeypatch.setattr(ba, "_AUCTION_ROUNDS", 0)
    assert torch.equal(warm, solve_balanced_assignment(a))
    assert torch.bincount(warm, minlength=12).tolist() == list(expert_capacities(300, 12))
