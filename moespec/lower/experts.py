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

from moespec.ir.nodes import ExpertGroupNode, MoELayerNode, SharedNode
from moespec.lower.builder import Builder

OPS = torch.ops.moespec


def expert_op(layer: MoELayerNode, combine: bool) -> torch._ops.OpOverloadPacket:
    """The layer's expert op: ``expert_ffn`` (rows) or ``expert_ffn_combine``, run by the torch
    kernels, or its ``triton_`` twin (same schema) for ``target.backend: triton``."""
    prefix = "triton_" if layer.backend == "triton" else ""
    return getattr(OPS, f"{prefix}expert_ffn{'_combine' if combine else ''}")


def ffn_args(b: Builder, prefix: str, ffn: ExpertGroupNode | SharedNode, empty_x: fx.Node) -> tuple:
    """The parameters ``{prefix}.w_up`` ... of an expert group or the shared experts, in
    ``ExpertWeights`` order (``moespec.ops._expert_weights``; an absent one as ``empty_x``),
    and the activation: the expert ops' trailing arguments."""
    glu, bias = ffn.kind == "glu", ffn.bias
    p = lambda name, present=True: b.get(f"{prefix}.{name}") if present else empty_x  # noqa: E731
    w = p("w_up"), p("w_gate", glu), p("w_down")
    return (*w, p("b_up", bias), p("b_gate", glu and bias), p("b_down", bias), ffn.activation)


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
        weights = ffn_args(b, f"experts.{gi}", grp, empty_x)
        out = b.fn(op, *args(grp.first), *weights, origin=f"{at_e}.routed.{gi}")
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
    return _sum_groups(
        b, layer, x, expert_op(layer, False), lambda first: (x, token_idx, offsets, first), "h_ND"
    )


def combined_experts(
    b: Builder, layer: MoELayerNode, x: fx.Node, token_idx: fx.Node, row_w: fx.Node, offsets: fx.Node
) -> fx.Node:
    """y_TD = sum over expert groups g of moespec.expert_ffn_combine(x, token_idx_N, weight_N,
    offsets_E1, ...): the routed experts' weighted outputs summed per token (the combine fused
    into the expert op: no [N, D] rows in the graph)."""
    args = lambda first: (x, token_idx, row_w, offsets, first)  # noqa: E731
    return _sum_groups(b, layer, x, expert_op(layer, True), args, "y_TD")
