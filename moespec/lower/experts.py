"""The routed experts' part of a layer graph, shared by every layout (sorted token rows or
Soft MoE slot rows): one fused grouped FFN per expert group, summed.

Legend: N routed rows, D d_model.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder

OPS = torch.ops.moespec


def routed_experts(
    b: Builder, layer: MoELayerNode, x: fx.Node, token_idx: fx.Node, offsets: fx.Node
) -> fx.Node:
    """h_ND = sum over expert groups g of moespec.expert_ffn(x, token_idx_N, offsets_E1, ...):
    row n gathers x[token_idx[n]] and runs the expert that owns it (rows outside a group's
    offsets are zero in that group's output)."""
    at_e = layer.experts.origin
    empty_x = b.empty_like(x)
    h = None
    for gi, grp in enumerate(layer.experts.groups):
        p = lambda name, gi=gi: b.get(f"experts.{gi}.{name}")  # noqa: E731
        glu, bias_on = grp.kind == "glu", grp.bias
        out = b.fn(
            OPS.expert_ffn,
            x,
            token_idx,
            offsets,
            grp.first,
            p("w_up"),
            p("w_gate") if glu else empty_x,
            p("w_down"),
            p("b_up") if bias_on else empty_x,
            p("b_gate") if glu and bias_on else empty_x,
            p("b_down") if bias_on else empty_x,
            grp.activation,
            origin=f"{at_e}.routed.{gi}",
        )
        hg = b.item(out, 0, at_e, f"h{gi}_ND")
        h = hg if h is None else b.fn(operator.add, h, hg, origin=at_e)
    return h
