"""Lowering of `kind: base` (BASE layers):

a_TE      = linear(x, router.centroids)                      (router dtype)
idx_TK    = moespec.balanced_assignment(a.detach())[:, None]  (training; exact, no grad)
          | stable argmax of a                                (eval)
          | the recorded experts                              (routing replay)
weight_TK = sigmoid(a.gather(1, idx_TK))                      (α: the centroids' gradient)
residual  = (1 - α)·x                                         (added to the layer output)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.common.select import stable_topk
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, linear_logits

OPS = torch.ops.moespec


def base_assign(a_TE: Tensor, replay_idx_TK: Tensor) -> Tensor:
    """int64 [T, 1]: each token's expert under BASE's balanced assignment, or the recorded
    experts when replaying a routing (then the solver does not run)."""
    if replay_idx_TK.numel() > 0:
        return replay_idx_TK
    return OPS.balanced_assignment(a_TE.detach()).unsqueeze(1)


def base_gate(a_TE: Tensor, idx_TK: Tensor) -> Tensor:
    """α = σ(a[t, e_t]) [T, 1]: the sigmoid gate of the assigned expert."""
    return torch.sigmoid(a_TE.gather(1, idx_TK))


def base_residual(alpha_TK: Tensor, x_TD: Tensor) -> Tensor:
    """(1 - α)·x in the router dtype, cast back to x's dtype."""
    return ((1.0 - alpha_TK) * x_TD.to(alpha_TK.dtype)).to(x_TD.dtype)


@LOWERINGS.register("base")
class BaseLayerLowering(RouterLowering):
    replay = True

    def replay_k(self, layer: MoELayerNode) -> int | None:
        return 1

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, a = linear_logits(b, layer, x_TD, inputs, weight="router.centroids")
        replay_idx, replay_w = inputs["replay_idx_TK"], inputs["replay_w_TK"]
        if training:
            idx = b.fn(base_assign, a, replay_idx, origin=at)
        else:
            idx = b.fn(stable_topk, b.fn(torch.detach, a, origin=at), 1, origin=at)
            idx = b.fn(helpers.replayed_choice, idx, replay_idx, origin=at)
        # Replayed experts get the gate of the current centroids (or the recorded gate).
        alpha = b.fn(helpers.replayed_weight, b.fn(base_gate, a, idx, origin=at), replay_w, origin=at)
        probs = b.fn(torch.softmax, a, -1, origin=at)
        residual = b.fn(base_residual, alpha, x_TD, origin=at) if r.mix_residual else None
        return RouteNodes(a, probs, alpha, idx, residual_TD=residual)
