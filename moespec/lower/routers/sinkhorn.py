"""Lowering of `kind: sinkhorn` (S-BASE, Megatron-style):

logits    = linear(x, router.weight)                          (router dtype)
probs     = sigmoid(logits) | softmax(logits)
idx_TK    = moespec.sinkhorn_topk(logits.detach(), k, ...)    (training; no grad)
          | stable top-k of probs                             (eval)
weight_TK = probs.gather(1, idx_TK)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.common.select import stable_topk
from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering, linear_logits, replayed

OPS = torch.ops.moespec


def sinkhorn_select(logits_TE: Tensor, k: int, iterations: int, tol: float) -> Tensor:
    """int64 [T, k]: top-k of the Sinkhorn-balanced plan (no gradient)."""
    return OPS.sinkhorn_topk(logits_TE.detach(), k, iterations, tol)


@LOWERINGS.register("sinkhorn")
class SinkhornLowering(RouterLowering):
    replay = True

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs)
        if r.score_fn == "softmax":
            probs = b.fn(torch.softmax, logits, -1, origin=at)
        else:
            probs = b.fn(torch.sigmoid, logits, origin=at)
        if training:
            idx = b.fn(sinkhorn_select, logits, r.k, r.iterations, r.tol, origin=at)
        else:
            idx = b.fn(stable_topk, b.fn(torch.detach, probs, origin=at), r.k, origin=at)
        weight = b.fn(torch.gather, probs, 1, idx, origin=at)
        # Replay: the recorded experts, weighted by their scores as the router weighs its own.
        weight, idx = replayed(
            b, layer, (weight, idx, probs), logits, inputs, "softmax_then_topk", False, 1.0
        )
        return RouteNodes(logits, probs, weight, idx)
