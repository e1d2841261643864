"""IR -> ``torch.fx`` GraphModule, built node by node with the fx.Graph API (no tracing).

The graph of one MoE layer (``x_TD`` is [T, D]; random draws are graph inputs so the graph
is a pure function and exports cleanly):

    logits  = linear(x · jitter, router.weight) / temperature   (+ noise · std while training)
    weight_TK, idx_TK, probs_TE = moespec.topk_route(logits, expert_bias, gumbel, ...)
    keep_TK = moespec.capacity_keep(...)                        (capacity: factor)
    token_idx_N, slot_N, offsets_E1 = moespec.sort_by_expert(idx_TK, keep_TK)
    h_ND    = sum over expert groups g of moespec.expert_ffn(x_TD, token_idx_N, offsets_E1, ...)
    y_TD    = moespec.combine(h_ND, token_idx_N, row weights, T) (+ zero-compute, shared)
    aux     = losses and routing statistics

Each node records the spec path it lowers in ``node.meta["moespec_origin"]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

import moespec.ops  # noqa: F401  (registers torch.ops.moespec.*)
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.ops.reference._common import TORCH_DTYPES

OPS = torch.ops.moespec
OUTPUTS = (
    "y_TD",
    "router_logits",
    "aux_loss",
    "routed_per_expert",
    "tokens_per_expert",
    "dropped_fraction",
    "router_entropy",
    "load_ratio",
)


@dataclass(frozen=True)
class RandomInput:
    """A random tensor the layer draws outside the graph: ``dist`` is uniform, normal or
    gumbel; ``shape`` names its dims (T tokens, D d_model, E experts, K top-k)."""

    name: str
    dist: str
    shape: str
    train_only: bool


def random_inputs(layer: MoELayerNode, training: bool) -> list[RandomInput]:
    """The random graph inputs of ``layer``, in placeholder order (the reference's draw order)."""
    r, out = layer.router.config, []
    if training and getattr(r, "jitter", 0.0) > 0:
        out.append(RandomInput("jitter_u_TD", "uniform", "TD", True))
    if training and getattr(r, "noise", None) is not None:
        out.append(RandomInput("noise_TE", "normal", "TE", True))
    policy = getattr(r, "second_expert_policy", "all")
    if policy == "sampling":
        out.append(RandomInput("gumbel_TE", "gumbel", "TE", False))
    if policy == "random":
        out.append(RandomInput("second_u_T", "uniform", "T", False))
    cap = layer.dispatch.capacity
    if cap.kind == "factor" and cap.drop_policy == "random":
        out.append(RandomInput("drop_u_TK", "uniform", "TK", False))
    return out


class _Builder:
    def __init__(self, layer: MoELayerNode) -> None:
        self.g, self.layer = fx.Graph(), layer

    def fn(self, target, *args, origin: str, **kwargs) -> fx.Node:
        node = self.g.call_function(target, args, kwargs)
        node.meta["moespec_origin"] = origin
        return node

    def get(self, name: str) -> fx.Node:
        return self.g.get_attr(name)

    def item(self, node: fx.Node, i: int, origin: str, name: str | None = None) -> fx.Node:
        out = self.fn(operator.getitem, node, i, origin=origin)
        if name is not None:
            out._rename(name)  # readable gm.code: `weight_tk = topk_route[0]`
        return out


def lower_layer(layer: MoELayerNode, root: nn.Module, *, training: bool) -> fx.GraphModule:
    """Build the GraphModule of one layer in train or eval form; ``root`` owns the parameters
    (clean names) and an ``aux`` submodule (:class:`~moespec.lower.aux.AuxLossAndStats`)."""
    b, r = _Builder(layer), layer.router.config
    g = b.g
    x = g.placeholder("x_TD")
    rand = {ri.name: g.placeholder(ri.name) for ri in random_inputs(layer, training)}
    seq_len = g.placeholder("seq_len")
    at_r, at_d, at_e = layer.router.origin, layer.dispatch.origin, layer.experts.origin
    rdtype = TORCH_DTYPES[layer.router.dtype]

    # Router: logits in the router dtype (selective precision), jitter/noise while training.
    xr = g.call_method("to", (x, rdtype))
    if "jitter_u_TD" in rand:
        eps = r.jitter
        mult = b.fn(
            operator.add,
            1.0 - eps,
            b.fn(operator.mul, rand["jitter_u_TD"], 2.0 * eps, origin=at_r),
            origin=at_r,
        )
        xr = b.fn(operator.mul, xr, mult, origin=at_r)
    w_r = g.call_method("to", (b.get("router.weight"), rdtype))
    bias = g.call_method("to", (b.get("router.bias"), rdtype)) if r.bias else None
    logits = b.fn(F.linear, xr, w_r, bias, origin=at_r)
    if r.temperature != 1.0:
        logits = b.fn(operator.truediv, logits, r.temperature, origin=at_r)
    clean, noisy, std = logits, logits, g.call_method("new_empty", (logits, (0,)))
    if "noise_TE" in rand:
        if r.noise.kind == "learned":
            w_n = g.call_method("to", (b.get("router.noise_weight"), rdtype))
            sp = b.fn(F.softplus, b.fn(F.linear, xr, w_n, origin=at_r), origin=at_r)
            std = b.fn(operator.add, sp, r.noise.epsilon, origin=at_r)
        else:
            std = b.fn(torch.full_like, logits, r.noise.std, origin=at_r)
        noisy = b.fn(
            operator.add, logits, b.fn(operator.mul, rand["noise_TE"], std, origin=at_r), origin=at_r
        )
    empty_r = g.call_method("new_empty", (logits, (0,)))
    expert_bias = b.get("router.expert_bias") if r.expert_bias is not None else empty_r
    groups = r.groups
    route = b.fn(
        OPS.topk_route,
        noisy,
        expert_bias,
        rand.get("gumbel_TE", empty_r),
        r.k,
        r.score,
        r.order,
        r.renormalize,
        r.scaling_factor,
        groups.n_groups if groups else 0,
        groups.topk_groups if groups else 0,
        groups.group_score if groups else "max",
        origin=at_r,
    )
    weight, idx, probs = (
        b.item(route, i, at_r, n) for i, n in enumerate(("weight_TK", "idx_TK", "probs_TE"))
    )

    # Dispatch: GShard random second expert, capacity, sort by expert.
    if "second_u_T" in rand:
        active = b.fn(helpers.gshard_keep_second, weight, rand["second_u_T"], r.scaling_factor, origin=at_r)
    else:
        active = b.fn(torch.ones_like, idx, dtype=torch.bool, origin=at_d)
    cap, n_exp = layer.dispatch.capacity, layer.experts.n_experts
    keep = active
    if cap.kind == "factor":
        u = rand.get("drop_u_TK", empty_r)
        cap_factor = cap.train_factor if training else cap.eval_factor
        keep = b.fn(
            OPS.capacity_keep,
            idx,
            weight,
            active,
            u,
            n_exp,
            cap_factor,
            cap.min_capacity,
            cap.drop_policy,
            origin=at_d,
        )
    srt = b.fn(OPS.sort_by_expert, idx, keep, n_exp, origin=at_d)
    token_idx, slot, offsets = (
        b.item(srt, i, at_d, n) for i, n in enumerate(("token_idx_N", "slot_N", "offsets_E1"))
    )
    row_w = b.fn(helpers.gather_row_weights, weight, keep, slot, origin=at_d)

    # Experts: one fused grouped FFN per expert group, then the weighted combine.
    empty_x = g.call_method("new_empty", (x, (0,)))
    h = None
    for gi, grp in enumerate(layer.experts.groups):
        p = lambda name, grp=grp, gi=gi: b.get(f"experts.{gi}.{name}")  # noqa: E731
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
    n_tok = g.call_method("size", (x, 0))
    y = b.fn(OPS.combine, h, token_idx, row_w, n_tok, origin=layer.combine.origin)
    if layer.experts.zero_compute:
        gates = b.fn(helpers.dense_gates, weight, idx, keep, n_exp, origin=at_e)
        zc = layer.experts.zero_compute
        entries = tuple((z.kind, z.count) for z in zc)
        consts = tuple(
            (b.get(f"zero_compute.{zi}.w_c"), b.get(f"zero_compute.{zi}.v")) if z.kind == "constant" else None
            for zi, z in enumerate(zc)
        )
        zout = b.fn(helpers.zero_compute_output, x, gates, entries, zc[0].first, consts, origin=at_e)
        y = b.fn(operator.add, y, zout, origin=at_e)
    if layer.shared is not None:
        y = b.fn(operator.add, y, _shared(b, layer, x, empty_x), origin=layer.shared.origin)

    aux = g.call_module("aux", (clean, noisy, std, probs, idx, weight, active, keep, seq_len))
    outs = [y, clean] + [b.item(aux, i, layer.losses.origin, n) for i, n in enumerate(OUTPUTS[2:])]
    g.output(tuple(outs))
    g.lint()
    return fx.GraphModule(root, g, class_name=f"MoELayer_{layer.name}_{'train' if training else 'eval'}")


def _shared(b: _Builder, layer: MoELayerNode, x: fx.Node, empty_x: fx.Node) -> fx.Node:
    """Shared experts: S FFNs on every token through the same grouped op (rows = S·T)."""
    s, at = layer.shared, layer.shared.origin
    p = lambda name: b.get(f"shared.{name}")  # noqa: E731
    rows = b.fn(helpers.shared_rows, x, p("w_up"), origin=at)
    tok, offs = b.item(rows, 0, at), b.item(rows, 1, at)
    glu = s.kind == "glu"
    out = b.fn(
        OPS.expert_ffn,
        x,
        tok,
        offs,
        0,
        p("w_up"),
        p("w_gate") if glu else empty_x,
        p("w_down"),
        p("b_up") if s.bias else empty_x,
        p("b_gate") if glu and s.bias else empty_x,
        p("b_down") if s.bias else empty_x,
        s.activation,
        origin=at,
    )
    y = b.fn(helpers.sum_shared, b.item(out, 0, at), b.fn(len, p("w_up"), origin=at), origin=at)
    if s.gate:
        y = b.fn(helpers.gate_shared, y, x, p("gate"), origin=at)
    return y
