"""Lowering of `kind: cosine` (X-MoE, Chi et al. 2022):

logits_TE = cosine_scores(x, router.proj, router.expert_emb, log_tau) / tau
weight_TK, idx_TK, probs_TE = moespec.topk_route(logits, k, softmax, renormalize)

Two small GEMMs and two L2 normalisations, then the shared top-k op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import (
    LOWERINGS,
    RouteNodes,
    RouterLowering,
    plain_topk,
    replayed,
    router_input,
    router_param,
)
from moespec.spec.routers.cosine import MIN_TEMPERATURE

OPS = torch.ops.moespec
EPS = 1e-4  # torchscale's _cosine eps


def cosine_scores(
    x_TD: Tensor,
    proj_PD: Tensor,
    emb_EP: Tensor,
    log_tau: Tensor,
    temperature: float,
    normalize_tokens: bool,
) -> Tensor:
    """[T, E] cosine scores over the temperature: F.linear onto the unit expert embeddings
    of the (unit, if asked) projected tokens; ``log_tau`` a 0-element tensor when fixed."""
    h_TP = F.linear(x_TD, proj_PD)
    if normalize_tokens:
        h_TP = F.normalize(h_TP, dim=-1, eps=EPS)
    s_TE = F.linear(h_TP, F.normalize(emb_EP, dim=-1, eps=EPS))
    if log_tau.numel():
        return s_TE * torch.exp(-log_tau.clamp(min=math.log(MIN_TEMPERATURE)))
    return s_TE / temperature


@LOWERINGS.register("cosine")
class CosineLowering(RouterLowering):
    replay = True

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        xr = router_input(b, layer, x_TD, inputs)
        proj, emb = router_param(b, layer, "router.proj"), router_param(b, layer, "router.expert_emb")
        log_tau = b.empty_like(xr)
        if r.learnable_temperature:
            log_tau = router_param(b, layer, "router.log_temperature")
        logits = b.fn(cosine_scores, xr, proj, emb, log_tau, r.temperature, r.normalize_tokens, origin=at)
        route = plain_topk(b, layer, logits, r.k, r.renormalize)
        weight, idx, probs = (
            b.item(route, i, at, n) for i, n in enumerate(("weight_TK", "idx_TK", "probs_TE"))
        )
        weight, idx = replayed(b, layer, (weight, idx, probs), logits, inputs, "softmax_then_topk",
                               r.renormalize, 1.0)  # fmt: skip
        return RouteNodes(logits, probs, weight, idx)
