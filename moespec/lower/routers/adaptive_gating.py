"""Lowering of `kind: adaptive_gating`, token-choice form with K = 2:

logits_TE = linear(x, router.weight)                                   (router dtype)
p_TK, idx_TK, probs_TE = moespec.topk_route(logits_TE, k=2)            (raw top-2 probabilities)
weight_TK, active_TK = adaptive_top2(p_TK, threshold, weights)        (second used iff p1 − p2 ≤ τ)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, linear_logits, plain_topk

OPS = torch.ops.moespec


def adaptive_top2(p_TK: Tensor, threshold: float, mode: str) -> tuple[Tensor, Tensor]:
    """``(weight_TK, active_TK)`` from the raw top-2 probabilities: the second slot is active
    iff p1 − p2 ≤ threshold; weights normalised over the active slots (`kept`), over both
    (`top2`) or raw."""
    use2_T = (p_TK[:, 0] - p_TK[:, 1]).detach() <= threshold
    active_TK = torch.stack([torch.ones_like(use2_T), use2_T], dim=1)
    if mode == "raw":
        return p_TK, active_TK
    if mode == "top2":
        return p_TK / p_TK.sum(-1, keepdim=True), active_TK
    return p_TK / (p_TK * active_TK.to(p_TK.dtype)).sum(-1, keepdim=True), active_TK


@LOWERINGS.register("adaptive_gating")
class AdaptiveGatingLowering(RouterLowering):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs)
        route = plain_topk(b, layer, logits, 2, False)
        p, idx, probs = (b.item(route, i, at, n) for i, n in enumerate(("p_TK", "idx_TK", "probs_TE")))
        out = b.fn(adaptive_top2, p, r.threshold, r.weights, origin=at)
        weight, active = b.item(out, 0, at, "weight_TK"), b.item(out, 1, at, "active_TK")
        return RouteNodes(logits, probs, weight, idx, active)
