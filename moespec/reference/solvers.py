"""Plain solvers for the reference routers: BASE's balanced assignment and Sinkhorn's plan.

Written for obviousness, not speed, and independent of the fast path's solvers
(``moespec.ops.balanced_assignment``, ``moespec.ops.sinkhorn``), which they check.

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

SINKHORN_EPS = 1e-8
"""Megatron-LM's eps in the Sinkhorn denominators."""


# --- balanced assignment ---------------------------------------------------------------------


def expert_capacities(n_tokens: int, n_experts: int) -> list[int]:
    """c_e = T // E + [e < T mod E]: tokens expert e receives in the balanced assignment."""
    return [n_tokens // n_experts + (1 if e < n_tokens % n_experts else 0) for e in range(n_experts)]


def _finite(a_TE: Tensor) -> Tensor:
    """Non-finite affinities (nan, ±inf) become the smallest finite one (0 if none is)."""
    ok_TE = a_TE.isfinite()
    floor = a_TE[ok_TE].min() if bool(ok_TE.any()) else a_TE.new_zeros(())
    return torch.where(ok_TE, a_TE, floor)


def _exact_integers(a_TE: Tensor) -> list[list[int]]:
    """float64 entries scaled by one common power of two into Python ints, exactly.

    Every float64 is n / 2^k; multiplying all entries by the largest 2^k keeps each exact,
    so sums and comparisons below are exact (no tolerance anywhere)."""
    ratios = [[v.as_integer_ratio() for v in row] for row in a_TE.tolist()]
    denom = max((d for row in ratios for _, d in row), default=1)
    return [[n * (denom // d) for n, d in row] for row in ratios]


def hungarian(cost: list[list[int]]) -> list[int]:
    """Column of each row in a minimum-cost perfect assignment of a square matrix.

    The textbook Hungarian algorithm (Kuhn-Munkres with potentials u, v, O(n^3); the
    formulation of cp-algorithms.com "Hungarian algorithm"), on exact integers. Row i is
    added at step i; a Dijkstra-like sweep over the reduced costs cost[i][j] - u[i] - v[j]
    finds the cheapest augmenting path, the potentials keep every reduced cost >= 0 and the
    matched ones 0, which certifies optimality. Index 0 is the virtual start column."""
    n = len(cost)
    u, v = [0] * (n + 1), [0] * (n + 1)
    row_of = [0] * (n + 1)  # row_of[j]: the row (1-based) matched to column j, 0 if none
    way = [0] * (n + 1)  # the previous column on the augmenting path
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        minv, used = [float("inf")] * (n + 1), [False] * (n + 1)
        while row_of[j0] != 0:
            used[j0] = True
            i0, delta, j1 = row_of[j0], float("inf"), 0
            for j in range(1, n + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n + 1):
                if used[j]:
                    u[row_of[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:  # flip the path back to the start column
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col_of = [0] * n
    for j in range(1, n + 1):
        col_of[row_of[j] - 1] = j - 1
    return col_of


def balanced_assignment(scores_TE: Tensor) -> Tensor:
    """int64 [T]: e_t = the lexicographically smallest maximiser of Σ_t a[t, e_t] subject to
    |{t : e_t = e}| = c_e = T // E + [e < T mod E]  (exact; computed in float64, on CPU).

    Ties between optimal assignments go to the lower expert index, earliest token first
    (with no capacity binding that is the argmax with ties to the lower index). Non-finite
    affinities count as the smallest finite one.

    Method: expand expert e into c_e identical slots (T slots in all) and solve the T x T
    assignment problem with the Hungarian algorithm, on exact integers (the affinities
    scaled by a power of two) with the cost

        cost[t, slot of e] = -A[t, e] · E^T + e · E^(T-1-t)

    The second term is the assignment read as a base-E number e_0 e_1 ... e_{T-1}; it is
    below E^T, so it can only order assignments of equal total affinity, and among those
    the smallest number is the lexicographically smallest sequence. O(T^3) Python steps on
    integers of O(T log E) bits: meant for the small T of tests (T = 64 takes well under
    a second), not for training sizes.
    """
    n_tok, n_exp = scores_TE.shape
    if n_tok == 0:
        return torch.empty(0, dtype=torch.int64, device=scores_TE.device)
    a = _exact_integers(_finite(scores_TE.detach().to("cpu", torch.float64)))
    scale = n_exp**n_tok
    slot_expert = [e for e, c in enumerate(expert_capacities(n_tok, n_exp)) for _ in range(c)]
    cost = [[-a[t][e] * scale + e * n_exp ** (n_tok - 1 - t) for e in slot_expert] for t in range(n_tok)]
    expert_T = [slot_expert[j] for j in hungarian(cost)]
    return torch.tensor(expert_T, dtype=torch.int64, device=scores_TE.device)


# --- Sinkhorn --------------------------------------------------------------------------------


def sinkhorn_plan(logits_TE: Tensor, iterations: int, tol: float) -> Tensor:
    """The Sinkhorn-balanced plan P [T, E] of the logits (float32, no gradient).

    Sinkhorn-Knopp scaling of C = exp(z - max z), as Megatron-LM's ``sinkhorn`` writes it:

        d0_t = (1/T) / (Σ_e C[t, e] d1_e + eps)       (rows)
        d1_e = (1/E) / (Σ_t d0_t C[t, e] + eps)       (columns), eps = 1e-8, d0 = d1 = 1 at start
        stop after the round where mean_e |d1_e - d1_e(previous round)| <= tol, or after
        ``iterations`` rounds;   P[t, e] = d0_t C[t, e] d1_e
    """
    c_TE = logits_TE.detach().float()
    n_tok, n_exp = c_TE.shape
    if n_tok == 0:
        return c_TE
    c_TE = torch.exp(c_TE - c_TE.max())
    d0_T, d1_E = c_TE.new_ones(n_tok), c_TE.new_ones(n_exp)
    for _ in range(iterations):
        # C d1 and d0^T C as matrix-vector products: with identical tokens every entry of
        # the plan is 1/(T E) exactly and the top-k rests on rounding, so the reference
        # rounds as the fast path does.
        d0_T = (1.0 / n_tok) / (c_TE @ d1_E + SINKHORN_EPS)
        new_d1_E = (1.0 / n_exp) / (d0_T @ c_TE + SINKHORN_EPS)
        converged = bool((new_d1_E - d1_E).abs().mean() <= tol)
        d1_E = new_d1_E
        if converged:
            break
    return d0_T[:, None] * c_TE * d1_E
