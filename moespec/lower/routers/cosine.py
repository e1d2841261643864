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

from moespec.common.dtypes import TORCH_DTYPES
from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import RouteNodes, RouterLowering, register
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


@register
class CosineLowering(RouterLowering):
    kind = "cosine"

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        rdtype = TORCH_DTYPES[layer.router.dtype]
        xr = b.to(x_TD, rdtype)
        proj, emb = b.to(b.get("router.proj"), rdtype), b.to(b.get("router.expert_emb"), rdtype)
        log_tau = (
            b.to(b.get("router.log_temperature"), rdtype) if r.learnable_temperature else b.empty_like(xr)
        )
        logits = b.fn(cosine_scores, xr, proj, emb, log_tau, r.temperature, r.normalize_tokens, origin=at)
        empty = b.empty_like(logits)
        route = b.fn(
            OPS.topk_route,
            logits,
            empty,
            empty,
            r.k,
            "softmax",
            "softmax_then_topk",
            r.renormalize,
            1.0,
            0,
            0,
            "max",
            origin=at,
        )
        weight, idx, probs = (
            b.item(route, i, at, n) for i, n in enumerate(("weight_TK", "idx_TK", "probs_TE"))
        )
        active = b.fn(torch.ones_like, idx, dtype=torch.bool, origin=at)
        return RouteNodes(logits, logits, empty, probs, weight, idx, active)
