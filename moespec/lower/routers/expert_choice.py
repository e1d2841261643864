"""Lowering of `kind: expert_choice` (dense form):

logits_TE   = linear(x, router.weight, router.bias)   in the router dtype
probs_TE    = softmax(logits_TE)
selected_TE = moespec.expert_choice_select(probs_TE, capacity factor, min_capacity, group_size)
gates_TE    = probs_TE * selected_TE                   (the combine weights S[t, e])

The generic layer compacts the selected (token, expert) pairs with ``moespec::sort_selected``
(exactly C rows per expert and group), runs the grouped experts and the weighted combine.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, dense_slots, linear_logits

OPS = torch.ops.moespec


def expert_choice_slots(probs_TE: Tensor, selected_TE: Tensor) -> tuple[Tensor, Tensor]:
    """``(gates_TE, idx_TE)`` of the dense form: the chosen scores (zero elsewhere) and
    slot e = expert e."""
    gates_TE = probs_TE * selected_TE.to(probs_TE.dtype)
    return gates_TE, dense_slots(selected_TE)


@LOWERINGS.register("expert_choice")
class ExpertChoiceLowering(RouterLowering):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs, bias="router.bias" if r.bias else None)
        probs = b.fn(torch.softmax, logits, -1, origin=at)
        scores = b.g.call_method("detach", (probs,))
        selected = b.fn(
            OPS.expert_choice_select, scores, r.factor(training), r.min_capacity, r.group_size or 0, origin=at
        )
        slots = b.fn(expert_choice_slots, probs, selected, origin=at)
        gates, idx = b.item(slots, 0, at, "gates_TE"), b.item(slots, 1, at, "idx_TE")
        return RouteNodes(logits, probs, gates, idx, selected, dense=True)
