"""Lowering of `kind: relu` (ReMoE), dense form:

logits_TE = linear(x · jitter, router.weight)          (router dtype)
R_TE      = relu(logits_TE);  selected_TE = R_TE > 0;  gates = R_TE
extra     = remoe_l1_loss(R_TE, clone(router.l1_coeff), k)
after a training forward: router.l1_coeff ← λ·α or λ/α (ReMoE's controller, on device)
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, fx, nn

from moespec.common.controllers import update_l1_coeff
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder, RandomInput
from moespec.lower.routers import JITTER, LOWERINGS, DenseReplay, RouteNodes, dense_slots, linear_logits


def remoe_l1_loss(r_TE: Tensor, l1_coeff: Tensor, k: int) -> Tensor:
    """λ · E/(T² k) · Σ_e (Σ_t R_te)(Σ_t [R_te > 0]); T = 0 gives 0 (no division by 0)."""
    t_count, n_experts = r_TE.shape
    n_E = (r_TE > 0).sum(0).to(r_TE.dtype)
    scale = n_experts / (max(t_count, 1) ** 2 * k)
    return l1_coeff.to(r_TE.dtype) * scale * (r_TE.sum(0) * n_E).sum()


@LOWERINGS.register("relu")
class ReLULowering(DenseReplay):
    def random_inputs(self, layer: MoELayerNode, training: bool) -> list[RandomInput]:
        if training and layer.router.config.jitter > 0:
            return [JITTER]
        return []

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs)
        relu = gates = b.fn(torch.relu, logits, origin=at)
        selected = b.fn(operator.gt, gates, 0, origin=at)
        # Routing replay: the recorded experts, gated by the current ReLU (0 where it is 0);
        # the L1 term keeps reading the router's own gates.
        selected = b.fn(helpers.replayed_selection, selected, inputs["replay_idx_TK"], origin=at)
        gates = b.fn(helpers.replayed_gates, gates, inputs["replay_idx_TK"], origin=at)
        gates = b.fn(helpers.replayed_weight, gates, inputs["replay_w_TK"], origin=at)
        idx = b.fn(dense_slots, selected, origin=at)
        probs = b.fn(torch.softmax, logits, -1, origin=at)
        # A copy of λ: after_forward updates the buffer in place before backward runs.
        lam = b.fn(torch.clone, b.get("router.l1_coeff"), origin=at)
        extra = b.fn(remoe_l1_loss, relu, lam, r.k, origin=at)
        return RouteNodes(logits, probs, gates, idx, selected, dense=True, extra_loss=extra)

    def after_forward(self, module: nn.Module, stats: dict[str, Tensor]) -> None:
        # ReMoE's controller, per layer and per training forward, on device (no host sync):
        # λ·α when the routing was denser than the target k/E, λ/α otherwise.
        cfg, lam = module.ir.router.config, module.router.l1_coeff
        t_count = module.router_logits.shape[0]
        lam.copy_(update_l1_coeff(lam, stats["routed_per_expert"], t_count, cfg.k, cfg.l1_multiplier))
