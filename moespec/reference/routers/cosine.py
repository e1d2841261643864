"""`kind: cosine`: X-MoE cosine routing (Chi et al. 2022, arXiv:2204.09179), the reference.

    h_t   = W_proj x_t                                  (router.proj [P, D])
    ĥ_t   = h_t / max(‖h_t‖, 1e-4)   if normalize_tokens  (the paper; torchscale skips it)
    ê_e   = e_e / max(‖e_e‖, 1e-4)                       (router.expert_emb [E, P])
    tau   = temperature, or max(exp(router.log_temperature), 0.01) when learnable
    s_te  = <ĥ_t, ê_e> / tau                              (the logits)
    p_t   = softmax(s_t);  S_t = top-k of p_t (ties to the lower index)
    w_te  = p_te for e in S_t, divided by sum_{S_t} p if renormalize

The eps 1e-4 of the normalisations is torchscale's ``_cosine``. Everything in the router
dtype (the spec's ``dtype`` or ``target.router_dtype``).

Shape legend: T tokens, D d_model, P proj_dim, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moespec.common.routing import RoutingResult, token_choice_routing
from moespec.common.select import stable_topk
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, router_dtype
from moespec.spec.routers.cosine import MIN_TEMPERATURE, CosineRouter

EPS = 1e-4


def cosine_logits(x_TD: Tensor, params: dict[str, Tensor], spec: CosineRouter, dtype: torch.dtype) -> Tensor:
    """s [T, E] = cos(W_proj x, e) / tau (token normalisation as configured)."""
    h_TP = x_TD.to(dtype) @ params["router.proj"].to(dtype).T
    if spec.normalize_tokens:
        h_TP = F.normalize(h_TP, p=2.0, dim=-1, eps=EPS)
    e_EP = F.normalize(params["router.expert_emb"].to(dtype), p=2.0, dim=-1, eps=EPS)
    s_TE = h_TP @ e_EP.T
    if spec.learnable_temperature:
        log_tau = params["router.log_temperature"].to(dtype).clamp(min=math.log(MIN_TEMPERATURE))
        return s_TE / log_tau.exp()
    return s_TE / spec.temperature


@REFERENCE_ROUTERS.register("cosine")
def cosine_route(
    x_TD: Tensor, params: dict[str, Tensor], spec: CosineRouter, ctx: RouteContext
) -> RoutingResult:
    """Cosine-score top-k routing (see the module docstring)."""
    dtype = router_dtype(spec, ctx)
    logits_TE = cosine_logits(x_TD, params, spec, dtype)
    probs_TE = logits_TE.softmax(-1)
    idx_TK = stable_topk(probs_TE, spec.k)
    weight_TK = probs_TE.gather(1, idx_TK)
    if spec.renormalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    return token_choice_routing(logits_TE, probs_TE, weight_TK, idx_TK, ctx.n_experts)
