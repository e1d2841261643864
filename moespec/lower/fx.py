"""IR -> ``torch.fx`` GraphModule, built node by node with the fx.Graph API (no tracing).

The graph of one MoE layer (``x_TD`` is [T, D]; random draws are graph inputs so the graph
is a pure function and exports cleanly):

    weight_TK, idx_TK, active_TK = the router kind's lowering   (moespec.lower.routers.<kind>)
    keep_TK = moespec.capacity_keep(...)                        (capacity: factor)
    token_idx_N, slot_N, offsets_E1 = moespec.sort_by_expert(idx_TK, keep_TK)
                                   (or moespec.sort_selected(keep_TK) for dense routings)
    y_TD    = sum over expert groups g of moespec.expert_ffn_combine(x_TD, token_idx_N, row weights,
                  offsets_E1, ...)   (each group's experts, weighted and summed per token)
              (+ zero-compute, shared)
    aux     = losses and routing statistics

Expert parallelism (``ep=True``, a layer after ``moespec.parallelize``): capacity, the
routed experts and the loss-and-statistics inputs become steps of the layer's plan
(``self._ep``, :class:`moespec.parallel.plan.EPPlan`): global capacity, the experts behind an
all-to-all, losses and statistics over every rank's tokens. Routing, zero-compute and shared
experts are the same nodes as on one process.

Each node records the spec path it lowers in ``node.meta["moespec_origin"]``.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

import moespec.ops  # noqa: F401  (registers torch.ops.moespec.*)
from moespec.common.capacity import capacity_factor
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers, soft
from moespec.lower.builder import Builder, RandomInput
from moespec.lower.experts import combined_experts, expert_op, ffn_args
from moespec.lower.routers import SoftNodes, lowering
from moespec.spec.routers.base import ExtraInput

OPS = torch.ops.moespec
# The inputs of a router that takes a routing replay (RouterLowering.replay), after the
# extra inputs: the recorded choices [T, K] and, when replaying recorded weights, those.
REPLAY_INPUTS = ("replay_idx_TK", "replay_w_TK")
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


def random_inputs(layer: MoELayerNode, training: bool) -> list[RandomInput]:
    """The random graph inputs of ``layer``, in placeholder order (the reference's draw
    order): the router's, then the capacity's random drop priorities."""
    out = lowering(layer).random_inputs(layer, training)
    cap = layer.dispatch.capacity
    if cap.kind == "factor" and cap.drop_policy == "random":
        out.append(RandomInput("drop_u_TK", "uniform", "TK", False))
    return out


def schedule_inputs(layer: MoELayerNode) -> tuple[str, ...]:
    """The scheduled fields of ``layer`` (``router.k``, ...), fed as 0-dim tensors."""
    return tuple(s.param for s in layer.schedules)


def extra_inputs(layer: MoELayerNode) -> tuple[ExtraInput, ...]:
    """Extra forward inputs of ``layer`` (e.g. ``input_ids``; the router spec declares them),
    each [T, *trailing] in the graph."""
    return layer.router.extra_inputs


def lower_layer(
    layer: MoELayerNode, root: nn.Module, *, training: bool, ep: bool = False, stats: bool = False
) -> fx.GraphModule:
    """Build the GraphModule of one layer in train or eval form; ``root`` owns the parameters
    (clean names) and an ``aux`` submodule (:class:`~moespec.lower.aux.AuxLossAndStats`);
    with ``ep`` also the expert-parallel plan ``_ep``, with ``stats`` the
    :class:`~moespec.parallel.tokens.TokenGroup` ``_stats`` whose tokens the losses and
    statistics run over (``scope: global`` on a mesh wider than ``ep``)."""
    b = Builder(layer)
    g = b.g
    x = g.placeholder("x_TD")
    inputs = {e.name: g.placeholder(e.name) for e in extra_inputs(layer)}
    if lowering(layer).replay:  # routing replay's choices (empty tensors when not replaying)
        inputs |= {n: g.placeholder(n) for n in REPLAY_INPUTS}
    # Scheduled values reach the router as `inputs["router.k"]` etc.
    inputs |= {p: g.placeholder("sched_" + p.replace(".", "_")) for p in schedule_inputs(layer)}
    rand = {ri.name: g.placeholder(ri.name) for ri in random_inputs(layer, training)}
    seq_len = g.placeholder("seq_len")
    at_d, at_e = layer.dispatch.origin, layer.experts.origin
    if layer.heads > 1:
        # Multi-head MoE: everything below works on T·h sub-tokens of width D/h.
        x, seq_len = _split_heads(b, layer, x, seq_len)

    rt = lowering(layer).lower(b, layer, x, {**inputs, **rand, "seq_len": seq_len}, training)
    plan = b.get("_ep") if ep else None
    sizes = None  # every rank's token count; the experts' exchange carries it when dropless
    if ep and (isinstance(rt, SoftNodes) or layer.dispatch.capacity.kind == "factor"):
        sizes = b.method(plan, "token_sizes", x, origin=layer.placement.origin)
    if isinstance(rt, SoftNodes):
        # Token-mixing routers (Soft MoE): experts run on slot mixes of the tokens.
        y, stats = soft.lower_soft(b, layer, x, rt, seq_len, plan, sizes)
        if layer.shared is not None:
            y = b.fn(operator.add, y, _shared(b, layer, x), origin=layer.shared.origin)
        named = enumerate(OUTPUTS[2:])
        outs = [_merge_heads(b, layer, y), rt.logits_TS] + [
            b.item(stats, i, layer.losses.origin, n) for i, n in named
        ]
        g.output((*outs, None, None))  # no per-token choices to record
        g.lint()
        return fx.GraphModule(root, g, class_name=f"MoELayer_{layer.name}_{'train' if training else 'eval'}")
    weight, idx, active = rt.weight_TK, rt.idx_TK, rt.active_TK
    empty_r = b.empty_like(rt.logits_TE)
    if active is None:  # every slot active
        active = b.fn(torch.ones_like, idx, dtype=torch.bool, origin=layer.router.origin)
    noisy = rt.noisy_TE if rt.noisy_TE is not None else rt.logits_TE  # no noise: the clean logits
    std = rt.std_TE if rt.std_TE is not None else empty_r

    # Dispatch: capacity, sort by expert (dense routings: compact the selected pairs).
    cap, n_exp = layer.dispatch.capacity, layer.experts.n_experts
    keep = active
    if cap.kind == "factor":
        u = rand.get("drop_u_TK", empty_r)
        # The op's `factor` is the spec's train_factor while training, eval_factor in eval.
        factor = capacity_factor(cap, training)
        cap_args = (idx, weight, active, u, n_exp, factor, cap.min_capacity, cap.drop_policy)
        if ep:  # C and the priority order over every rank's slots
            keep = b.method(plan, "capacity_keep", sizes, *cap_args, origin=at_d)
        else:
            keep = b.fn(OPS.capacity_keep, *cap_args, origin=at_d)
    if rt.dense:
        srt = b.fn(OPS.sort_selected, keep, origin=at_d)
    else:
        srt = b.fn(OPS.sort_by_expert, idx, keep, n_exp, origin=at_d)
    token_idx, slot, offsets = (
        b.item(srt, i, at_d, n) for i, n in enumerate(("token_idx_N", "slot_N", "offsets_E1"))
    )
    row_w = b.fn(helpers.gather_row_weights, weight, keep, slot, origin=at_d)

    # Experts: one fused grouped FFN with the weighted combine per expert group.
    if ep:
        empty_x = b.empty_like(x)
        group_args = tuple(
            ffn_args(b, f"experts.{gi}", grp, empty_x) for gi, grp in enumerate(layer.experts.groups)
        )
        both = b.method(plan, "experts", x, token_idx, row_w, offsets, group_args, sizes, origin=at_e)
        y, sizes = b.item(both, 0, at_e), b.item(both, 1, at_e)
    else:
        y = combined_experts(b, layer, x, token_idx, row_w, offsets)
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
        y = b.fn(operator.add, y, _shared(b, layer, x), origin=layer.shared.origin)
    if rt.residual_TD is not None:
        y = b.fn(operator.add, y, rt.residual_TD, origin=layer.router.origin)

    extra = rt.extra_loss if rt.extra_loss is not None else empty_r
    aux_args = (rt.logits_TE, noisy, std, rt.probs_TE, idx, weight, active, keep, extra, seq_len)
    aux_kwargs = {} if rt.k_active is None else {"k_active": rt.k_active}
    if stats or ep:  # losses and statistics over every rank's tokens (of the mesh when global)
        group = b.get("_stats") if stats else plan
        if stats:
            sizes = b.method(group, "token_sizes", x, origin=layer.losses.origin)
        both = b.method(group, "gather_aux", sizes, *aux_args, origin=layer.losses.origin)
        aux_args = tuple(b.item(both, i, layer.losses.origin) for i in range(len(aux_args)))
    y = _merge_heads(b, layer, y)
    if lowering(layer).replay_marks_unused:  # what a recording keeps: unused slots marked -1
        idx = b.fn(helpers.marked_choice, idx, active, origin=layer.router.origin)
    if not training and not (stats or ep):
        # Eval: the losses and statistics run only when read (MoELayer.aux_loss and
        # routing_stats call `aux` then); the graph returns their inputs. With a token group
        # they stay eager: `gather_aux` is a collective every rank must join.
        g.output((y, rt.logits_TE, *aux_args, *aux_kwargs.values(), idx, weight))
        g.lint()
        gm = fx.GraphModule(root, g, class_name=f"MoELayer_{layer.name}_eval")
        gm.lazy_aux = tuple(aux_kwargs)  # the keyword inputs of `aux`, after its 10 positional ones
        return gm
    aux = g.call_module("aux", aux_args, aux_kwargs)
    named = enumerate(OUTPUTS[2:])
    outs = [y, rt.logits_TE] + [b.item(aux, i, layer.losses.origin, n) for i, n in named]
    g.output((*outs, idx, weight))  # last: the chosen experts and weights, for routing replay
    g.lint()
    return fx.GraphModule(root, g, class_name=f"MoELayer_{layer.name}_{'train' if training else 'eval'}")


def _split_heads(b: Builder, layer: MoELayerNode, x: fx.Node, seq_len: fx.Node) -> tuple[fx.Node, fx.Node]:
    """MH-MoE input: x' = x W_in^T + b_in, each token's row split into h sub-token rows."""
    at = f"{layer.combine.origin}.multi_head"
    b_in = b.get("multi_head.b_in") if layer.head_bias else None
    sub = b.fn(helpers.split_heads, x, b.get("multi_head.w_in"), b_in, layer.heads, origin=at)
    return sub, b.fn(operator.mul, seq_len, layer.heads, origin=at)


def _merge_heads(b: Builder, layer: MoELayerNode, y: fx.Node) -> fx.Node:
    """MH-MoE output: the h sub-token rows of a token concatenated back, y W_out^T + b_out."""
    if layer.heads == 1:
        return y
    at = f"{layer.combine.origin}.multi_head"
    b_out = b.get("multi_head.b_out") if layer.head_bias else None
    return b.fn(helpers.merge_heads, y, b.get("multi_head.w_out"), b_out, layer.heads, origin=at)


def _shared(b: Builder, layer: MoELayerNode, x: fx.Node) -> fx.Node:
    """Shared experts: S FFNs on every token through the same grouped op (rows = S·T)."""
    s, at = layer.shared, layer.shared.origin
    p = lambda name: b.get(f"shared.{name}")  # noqa: E731
    rows = b.fn(helpers.shared_rows, x, p("w_up"), origin=at)
    tok, offs = b.item(rows, 0, at), b.item(rows, 1, at)
    out = b.fn(
        expert_op(layer, False), x, tok, offs, 0, *ffn_args(b, "shared", s, b.empty_like(x)), origin=at
    )
    y = b.fn(helpers.sum_shared, b.item(out, 0, at), b.fn(len, p("w_up"), origin=at), origin=at)
    if s.gate:
        y = b.fn(helpers.gate_shared, y, x, p("gate"), origin=at)
    return y
