"""``moespec::sinkhorn_topk``: top-k selection on Sinkhorn-balanced router scores.

Legend: T tokens, E experts, K top-k.

Sinkhorn balancing as Megatron-LM's ``sinkhorn`` (moe_utils.py) computes it, on
C = exp(logits - max(logits)) in float32:

    d0 = 1 / (T · (C d1 + eps))        (rows)
    d1 = 1 / (E · (C^T d0 + eps))      (columns), eps = 1e-8
    repeat while mean|d1 - d1_prev| > tol;  P = diag(d0) C diag(d1)

so the columns of P sum to 1/E and the rows to (nearly) 1/T: P is a balanced transport
plan (T·P is row-stochastic with columns summing to T/E). The selection is the top-k of
each row of P (ties to the lower index); it has no gradient.

Differences from Megatron, both harmless to the result: the global max is subtracted
before exp (Megatron overflows for logits > 88; the plan is invariant to a global factor
except through eps), and the loop is capped at ``iterations``. The cap is applied without a
host sync: past convergence the updates are masked out, so the result equals the uncapped
while-loop whenever it converges within the cap (on CPU the loop also exits early).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.select import stable_topk

EPS = 1e-8


def sinkhorn_plan(logits_TE: Tensor, iterations: int, tol: float) -> Tensor:
    """The Sinkhorn-balanced plan P [T, E] of ``logits_TE`` (float32, no gradient)."""
    cost_TE = logits_TE.detach().float()
    n_tok, n_exp = cost_TE.shape
    if n_tok == 0:
        return cost_TE
    cost_TE = torch.exp(cost_TE - cost_TE.max())
    d0_T = cost_TE.new_ones(n_tok)
    d1_E = cost_TE.new_ones(n_exp)
    done = torch.zeros((), dtype=torch.bool, device=cost_TE.device)
    for _ in range(iterations):
        new_d0_T = (1.0 / n_tok) / (cost_TE @ d1_E + EPS)
        new_d1_E = (1.0 / n_exp) / (new_d0_T @ cost_TE + EPS)
        err = (d1_E - new_d1_E).abs().mean()
        d0_T = torch.where(done, d0_T, new_d0_T)
        d1_E = torch.where(done, d1_E, new_d1_E)
        done = done | (err <= tol)
        if cost_TE.device.type == "cpu" and bool(done):
            break  # the masked updates would change nothing from here on
    return d0_T[:, None] * cost_TE * d1_E


@torch.library.custom_op("moespec::sinkhorn_topk", mutates_args=())
def sinkhorn_topk(logits_TE: Tensor, k: int, iterations: int, tol: float) -> Tensor:
    """int64 [T, k]: each row's k best experts under the Sinkhorn-balanced plan."""
    return stable_topk(sinkhorn_plan(logits_TE, iterations, tol), k).contiguous()


@sinkhorn_topk.register_fake
def _(logits_TE, k, iterations, tol):
    return logits_TE.new_empty(logits_TE.shape[0], k, dtype=torch.int64)
