"""`kind: sinkhorn`: Sinkhorn-balanced top-k routing (S-BASE), reference.

Math (T tokens, E experts, K = k, W = ``router.weight`` [E, D]):

    z_TE   = x W^T                                   (router dtype)
    p_TE   = σ(z) or softmax(z)                      (`score`; default sigmoid iff k = 1)
    P_TE   = Sinkhorn plan of exp(z): diag(d0) exp(z) diag(d1), the row and column scales
             alternately refit until mean|Δd1| ≤ tol (≤ `iterations` rounds), columns
             summing to 1/E and rows to ≈ 1/T   (float32, no gradient)
    idx_TK = top-k of each row of P (training) | top-k of p (eval); ties to the lower index
    w_TK   = p[t, idx_TK]                             (not renormalised)

Sources: Clark et al. 2022 (arXiv:2202.01169) introduce S-BASE, BASE's balanced assignment
approximated with Sinkhorn; the formulas are Megatron-LM's (``sinkhorn`` in
megatron/core/transformer/moe/moe_utils.py and ``TopKRouter.sinkhorn_load_balancing``):
selection from sinkhorn(logits) under no_grad, weights gathered from sigmoid (k = 1) or
softmax (k > 1) of the logits. Differences from Megatron: the score function can be chosen
(`score`), exp is taken of logits minus their global max (Megatron overflows above 88), and
the loop is capped at `iterations` (``moespec.reference.solvers.sinkhorn_plan``). The
paper's own gate for S-BASE was not checked against its text; Megatron's is used.
"""

from __future__ import annotations

from torch import Tensor

from moespec.common.routing import RoutingResult, token_choice_routing
from moespec.common.select import stable_topk
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.reference.solvers import sinkhorn_plan
from moespec.spec.routers.sinkhorn import SinkhornRouter


@REFERENCE_ROUTERS.register("sinkhorn")
def sinkhorn(
    x_TD: Tensor, params: dict[str, Tensor], spec: SinkhornRouter, ctx: RouteContext
) -> RoutingResult:
    """S-BASE routing: top-k of the Sinkhorn plan (training) or of the scores (eval)."""
    _, logits_TE = linear_logits(x_TD, params, spec, ctx)
    probs_TE = logits_TE.softmax(-1) if spec.score_fn == "softmax" else logits_TE.sigmoid()
    if ctx.training:
        idx_TK = stable_topk(sinkhorn_plan(logits_TE, spec.iterations, spec.tol), spec.k)
    else:
        idx_TK = stable_topk(probs_TE.detach(), spec.k)
    return token_choice_routing(logits_TE, probs_TE, probs_TE.gather(1, idx_TK), idx_TK, ctx.n_experts)
