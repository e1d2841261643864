"""Lowering of `kind: custom`: one call of the user's function, then the generic layer.

logits_TE, weight_TK, idx_TK = fn(x_TD, router.weight, **options)     (output: topk)
logits_TE, gates_TE = fn(x_TD, router.weight, **options)              (output: dense)
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, dense_slots
from moespec.spec.routers.custom import check_custom, resolve_function


@LOWERINGS.register("custom")
class CustomLowering(RouterLowering):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        w = b.get("router.weight")
        # The function itself is the node's target (resolved now, not inside the graph, so
        # torch.compile traces the user's code rather than an import).
        raw = b.fn(resolve_function(r.function), x_TD, w, origin=at, **r.options)
        out = b.fn(check_custom, raw, x_TD, w, r.function, r.output, r.k, origin=at)
        logits = b.item(out, 0, at, "logits_TE")
        probs = b.fn(torch.softmax, logits, -1, origin=at)
        if r.output == "dense":
            gates = b.item(out, 1, at, "gates_TE")
            sel = b.fn(operator.ne, gates, 0, origin=at)  # nonzero gates select
            idx = b.fn(dense_slots, sel, origin=at)
            return RouteNodes(logits, probs, gates, idx, sel, dense=True)
        weight, idx = b.item(out, 1, at, "weight_TK"), b.item(out, 2, at, "idx_TK")
        return RouteNodes(logits, probs, weight, idx)
