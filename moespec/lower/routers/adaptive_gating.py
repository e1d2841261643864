"""Lowering of `kind: adaptive_gating`, token-choice form with K = 2:

logits_TE = linear(x, router.weight)                                   (router dtype)
p_TK, idx_TK, probs_TE = moespec.topk_route(logits_TE, k=2)            (raw top-2 probabilities)
weight_TK, active_TK = adaptive_top2(p_TK, threshold, weights)        (second used iff p1 − p2 ≤ τ)
(routing replay: the recorded experts, unused second slots -1, with the current probabilities)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, linear_logits, plain_topk

OPS = torch.ops.moespec


def adaptive_top2(p_TK: Tensor, threshold: float, mode: str) -> tuple[Tensor, Tensor]:
    """``(weight_TK, active_TK)`` from the raw top-2 probabilities: the second slot is active
    iff p1 − p2 ≤ threshold; weights normalised over the active slots (`kept`), over both
    (`top2`) or raw."""
    use2_T = (p_TK[:, 0] - p_TK[:, 1]).detach() <= threshold
    active_TK = torch.stack([torch.ones_like(use2_T), use2_T], dim=1)
    return adaptive_weights(p_TK, active_TK, mode), active_TK


def adaptive_weights(p_TK: Tensor, active_TK: Tensor, mode: str) -> Tensor:
    """The slots' weights: raw, normalised over both slots (`top2`) or over the active ones
    (`kept`)."""
    if mode == "raw":
        return p_TK
    if mode == "top2":
        return p_TK / p_TK.sum(-1, keepdim=True)
    return p_TK / (p_TK * active_TK.to(p_TK.dtype)).sum(-1, keepdim=True)


def adaptive_route(p_TK: Tensor, idx_TK: Tensor, probs_TE: Tensor, replay_idx_TK: Tensor, threshold: float,
                   mode: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(weight_TK, idx_TK, active_TK)``: the router's own choice, or when replaying a
    recording (unused second slots marked -1) its experts with the router's current raw
    probabilities, weighted by the same rule."""
    if replay_idx_TK.numel() == 0:
        weight_TK, active_TK = adaptive_top2(p_TK, threshold, mode)
        return weight_TK, idx_TK, active_TK
    active_TK = replay_idx_TK >= 0
    idx_TK = torch.where(active_TK, replay_idx_TK, replay_idx_TK[:, :1])  # an unused slot: the first
    p_TK = probs_TE.gather(1, idx_TK)
    return adaptive_weights(p_TK, active_TK, mode), idx_TK, active_TK


@LOWERINGS.register("adaptive_gating")
class AdaptiveGatingLowering(RouterLowering):
    replay = True
    replay_marks_unused = True

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs)
        route = plain_topk(b, layer, logits, 2, False)
        p, idx, probs = (b.item(route, i, at, n) for i, n in enumerate(("p_TK", "idx_TK", "probs_TE")))
        out = b.fn(adaptive_route, p, idx, probs, inputs["replay_idx_TK"], r.threshold, r.weights, origin=at)
        names = ("weight_TK", "idx_TK", "active_TK")
        weight, idx, active = (b.item(out, i, at, n) for i, n in enumerate(names))
        weight = b.fn(helpers.replayed_weight, weight, inputs["replay_w_TK"], origin=at)
        return RouteNodes(logits, probs, weight, idx, active)

    def replay_k(self, layer: MoELayerNode) -> int | None:
        return 2

    def replay_problem(self, layer: MoELayerNode, idx_TK: Tensor) -> str | None:
        if idx_TK.numel() and int(idx_TK[:, 0].min()) < 0:
            return "leaves a token's first slot unused (-1): adaptive gating always uses its top-1 expert"
        return super().replay_problem(layer, idx_TK)
