"""The routed experts' part of a layer graph: one fused grouped FFN per expert group, summed,
either per routed row (``routed_experts``; Soft MoE's slot rows) or with the weighted combine
into tokens fused in (``combined_experts``; token routings).

Legend: T tokens, N routed rows, D d_model.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder

OPS = torch.ops.moespec


def _group_args(b: Builder, layer: MoELayerNode, gi: int, empty_x: fx.Node) -> tuple:
    """Expert group ``gi``'s parameters and activation, as the expert ops take them."""
    grp = layer.experts.groups[gi]
    p = lambda name: b.get(f"experts.{gi}.{name}")  # noqa: E731
    glu, bias_on = grp.kind == "glu", grp.bias
    return (
        p("w_up"),
        p("w_gate") if glu else empty_x,
        p("w_down"),
        p("b_up") if bias_on else empty_x,
        p("b_gate") if glu and bias_on else empty_x,
        p("b_down") if bias_on else empty_x,
        grp.activation,
    )


def _sum_groups(
    b: Builder,
    layer: MoELayerNode,
    x: fx.Node,
    op: torch._ops.OpOverloadPacket,
    args: Callable[[int], tuple],
    name: str,
) -> fx.Node:
    """Sum over expert groups g of ``op(*args(first), *group g's parameters)[0]`` (``first``:
    the group's first expert), each output named ``{name}{g}`` (name carries the shape suffix:
    ``y`` + ``_TD`` reads as ``y0_TD``)."""
    at_e = layer.experts.origin
    empty_x = b.empty_like(x)
    total = None
    for gi, grp in enumerate(layer.experts.groups):
        out = b.fn(op, *args(grp.first), *_group_args(b, layer, gi, empty_x), origin=f"{at_e}.routed.{gi}")
        stem, shape = name.split("_")
        part = b.item(out, 0, at_e, f"{stem}{gi}_{shape}")
        total = part if total is None else b.fn(operator.add, total, part, origin=at_e)
    return total


def routed_experts(
    b: Builder, layer: MoELayerNode, x: fx.Node, token_idx: fx.Node, offsets: fx.Node
) -> fx.Node:
    """h_ND = sum over expert groups g of moespec.expert_ffn(x, token_idx_N, offsets_E1, ...):
    row n gathers x[token_idx[n]] and runs the expert that owns it (rows outside a group's
    offsets are zero in that group's output)."""
    return _sum_groups(b, layer, x, OPS.expert_ffn, lambda first: (x, token_idx, offsets, first), "h_ND")


def combined_experts(
    b: Builder, layer: MoELayerNode, x: fx.Node, token_idx: fx.Node, row_w: fx.Node, offsets: fx.Node
) -> fx.Node:
    """y_TD = sum over expert groups g of moespec.expert_ffn_combine(x, token_idx_N, weight_N,
    offsets_E1, ...): the routed experts' weighted outputs summed per token (the combine fused
    into the expert op: no [N, D] rows in the graph)."""
    args = lambda first: (x, token_idx, row_w, offsets, first)  # noqa: E731
    return _sum_groups(b, layer, x, OPS.expert_ffn_combine, args, "y_TD")
