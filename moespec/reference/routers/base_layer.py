"""`kind: base`: BASE layers (Lewis et al. 2021, arXiv:2103.16716), reference.

Math (T tokens, D d_model, E experts, C = ``router.centroids`` [E, D]):

    a_TE  = x C^T                                   (router dtype)
    e_t   = balanced assignment of a (training):     argmax Σ_t a[t, e_t] subject to
            |{t : e_t = e}| = c_e = T // E + [e < T mod E]   (exact; no gradient; ties:
            the lexicographically smallest e_0 … e_{T-1})
          = argmax_e a[t, e] (eval; ties to the lower index)
    α_t   = σ(a[t, e_t])                            (the gradient reaches C and x here)
    y_t   = α_t · f_{e_t}(x_t) + (1 − α_t) · x_t   (combine weight α, residual (1 − α)·x)

Source: fairseq ``fairseq/modules/base_layer.py`` and ``clib/libbase/balanced_assignment.cpp``.
Choices where paper/code and this reference differ:
- fairseq computes a under ``no_grad`` and α again from the routed features with grad; the
  value is the same a[t, e_t], and here too no gradient passes through the assignment;
- fairseq's solver is an approximate auction (fixed epsilon, 100 rounds); this one is exact
  (Hungarian on exact integers, ``moespec.reference.solvers``: small T only), and it
  handles E ∤ T (fairseq needs T/E integral);
- fairseq's expert is a residual sublayer x + FFN(LN(x)); f_e here is the spec's expert FFN
  and ``mix_residual: false`` drops the (1 − α)·x term (see the spec docstring);
- ``base_shuffle`` (token permutation across data-parallel workers) is not modelled.
``probs_TE`` = softmax(a), only for the router-entropy statistic (BASE has no balance loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult
from moespec.common.select import stable_topk
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.reference.solvers import balanced_assignment
from moespec.spec.routers.base_layer import BaseLayerRouter


@REFERENCE_ROUTERS.register("base")
def base_layer(
    x_TD: Tensor, params: dict[str, Tensor], spec: BaseLayerRouter, ctx: RouteContext
) -> RoutingResult:
    """BASE routing: balanced assignment (training) or argmax (eval), sigmoid gate α."""
    xr_TD, a_TE = linear_logits(x_TD, params, spec, ctx, weight="router.centroids")
    # Training: the plain exact solver (ties: lexicographically smallest); eval: argmax.
    idx_TK = balanced_assignment(a_TE.detach())[:, None] if ctx.training else stable_topk(a_TE.detach(), 1)
    alpha_TK = torch.sigmoid(a_TE.gather(1, idx_TK))
    residual_TD = (1.0 - alpha_TK) * xr_TD if spec.mix_residual else None
    return RoutingResult(
        logits_TE=a_TE,
        noisy_logits_TE=a_TE,
        noise_std_TE=None,
        probs_TE=a_TE.softmax(-1),
        topk_idx_TK=idx_TK,
        topk_weight_TK=alpha_TK,
        active_TK=torch.ones_like(idx_TK, dtype=torch.bool),
        n_experts=ctx.n_experts,
        residual_TD=residual_TD,
    )
