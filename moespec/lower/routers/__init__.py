"""FX lowerings of the router kinds, one module per kind, registered by kind.

A router lowering is a :class:`RouterLowering` subclass. ``lower`` appends the router's
nodes to the layer graph and returns :class:`RouteNodes`; the generic part of the layer
(capacity, sort by expert, experts, combine, losses, stats; ``moespec.lower.fx``) does the
rest, so a new router never touches dispatch or experts. Two forms:

- token choice: ``weight_TK``, ``idx_TK``, ``active_TK`` with a static K per token;
- dense (``dense=True``): K = E, ``idx_TK`` is each row's 0..E-1, ``active_TK`` the
  selection mask and ``weight_TK`` the [T, E] gates; rows are compacted by
  ``moespec::sort_selected``, so only selected (token, expert) pairs reach the experts.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, fx

import moespec.ops  # noqa: F401  (registers torch.ops.moespec.*)
from moespec.common.dtypes import TORCH_DTYPES
from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder, RandomInput
from moespec.spec.base import KindTable
from moespec.spec.routers import ROUTERS

if TYPE_CHECKING:
    from torch import nn

OPS = torch.ops.moespec


@dataclass
class RouteNodes:
    """The router's graph values (see the package docstring). ``logits_TE`` are the clean
    logits (the layer's ``router_logits``, the z-loss input); ``probs_TE`` the scores the
    balance losses and entropy read; ``weight_TK``/``idx_TK``/``active_TK`` the routing
    (``active_TK`` None: every slot active); ``noisy_TE``/``std_TE`` the noisy logits and
    noise std (None: no noise, the clean logits); ``extra_loss`` a router-specific weighted
    loss added to ``aux_loss``; ``residual_TD`` a [T, D] term added to the layer's output
    (BASE's (1 - α)·x mix), or None; ``k_active`` a 0-dim tensor k when a schedule masks
    the compiled K down (the balance losses then normalise by it). (The k balance losses
    normalise by in the dense form is the spec's :meth:`RouterSpec.nominal_k`.)"""

    logits_TE: fx.Node
    probs_TE: fx.Node
    weight_TK: fx.Node
    idx_TK: fx.Node
    active_TK: fx.Node | None = None
    noisy_TE: fx.Node | None = None
    std_TE: fx.Node | None = None
    dense: bool = False
    extra_loss: fx.Node | None = None
    residual_TD: fx.Node | None = None
    k_active: fx.Node | None = None


@dataclass
class SoftNodes:
    """A token-mixing routing (Soft MoE; laid out by ``moespec.lower.soft``): ``logits_TS``
    the slot logits [T, S] (the layer's ``router_logits``), ``dispatch_TS`` each slot's
    weights over the tokens of its group (a softmax over the group's tokens), ``combine_TS``
    each token's weights over all S slots; S = E·p slots, slot s feeding expert s // p."""

    logits_TS: fx.Node
    dispatch_TS: fx.Node
    combine_TS: fx.Node


class RouterLowering:
    """Base class: override ``lower``; the hooks have no-op defaults. ``replay`` says whether
    the router takes a routing replay (``moespec.replay_routing``): its graph then reads the
    inputs ``replay_idx_TK`` / ``replay_w_TK`` (empty when not replaying)."""

    replay = False
    # The number of experts varies per token (top-p, ReLU, DSelect-k, adaptive gating): a
    # recording marks the slots a token does not use -1 (``helpers.marked_choice``).
    replay_marks_unused = False

    def replay_k(self, layer: MoELayerNode) -> int | None:
        """Slots per token a replayed recording must hold (None: any)."""
        return getattr(layer.router.config, "k", None)

    def replay_problem(self, layer: MoELayerNode, idx_TK: Tensor) -> str | None:
        """What is wrong with one call's recorded choice for this router (None: nothing):
        experts in 0..E-1, or -1 in the slots a token leaves unused where the router marks them."""
        n_exp, low = layer.experts.n_experts, -1 if self.replay_marks_unused else 0
        if idx_TK.numel() and (int(idx_TK.min()) < low or int(idx_TK.max()) >= n_exp):
            return f"names experts outside {low}..{n_exp - 1}"
        return None

    def random_inputs(self, layer: MoELayerNode, training: bool) -> list[RandomInput]:
        """Random tensors the graph takes as inputs, in the reference's draw order."""
        return []

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes | SoftNodes:
        """Append the router's nodes; ``inputs`` maps random and extra input names (the extra
        inputs the router spec declares, ``RouterSpec.extra_inputs``) to nodes,
        and ``seq_len`` to the layer's sequence length (0 unless the input is 3-D)."""
        raise NotImplementedError

    def after_forward(self, module: nn.Module, stats: dict[str, Tensor]) -> None:
        """Training-mode state update after a forward (under no_grad), e.g. a bias or an
        L1 coefficient controller; ``stats`` is the layer's ``routing_stats``."""


class DenseReplay(RouterLowering):
    """Routing replay of a dense-form router (slot e is expert e): the recording holds, per
    token, every expert with the unselected ones marked -1."""

    replay = True
    replay_marks_unused = True

    def replay_k(self, layer: MoELayerNode) -> int | None:
        return layer.experts.n_experts

    def replay_problem(self, layer: MoELayerNode, idx_TE: Tensor) -> str | None:
        # Slot e is expert e: a recorded slot holds e (selected) or -1 (not).
        slot_E = torch.arange(idx_TE.shape[1], device=idx_TE.device)
        if not bool(((idx_TE == slot_E) | (idx_TE == -1)).all()):
            return "is not a selection over every expert (slot e must hold e or -1)"
        return None


JITTER = RandomInput("jitter_u_TD", "uniform", "TD", True)
"""The Switch input-jitter draw U [T, D] (training only), shared by routers with ``jitter``."""


def router_param(b: Builder, layer: MoELayerNode, name: str) -> fx.Node:
    """The router tensor ``name`` cast to the router dtype (selective precision)."""
    return b.to(b.get(name), TORCH_DTYPES[layer.router.dtype])


def linear_logits(
    b: Builder,
    layer: MoELayerNode,
    x_TD: fx.Node,
    inputs: dict[str, fx.Node],
    weight: str = "router.weight",
    bias: str | None = None,
) -> tuple[fx.Node, fx.Node]:
    """The opening most routers share: ``(xr_TD, logits_TE)``, xr = :func:`router_input`
    and logits = linear(xr, ``weight``, ``bias``), the tensors in the router dtype."""
    xr = router_input(b, layer, x_TD, inputs)
    w = router_param(b, layer, weight)
    logits = b.fn(F.linear, xr, w, router_param(b, layer, bias) if bias else None, origin=layer.router.origin)
    return xr, logits


def topk_route_op(layer: MoELayerNode, sampling: bool = False) -> torch._ops.OpOverloadPacket:
    """The top-k routing op of the layer's backend: ``triton_topk_route`` (the fused Triton
    router) for ``target.backend: triton``, except with GShard's second-expert sampling, which
    the kernel does not do; ``topk_route`` otherwise (same schema, same results)."""
    return OPS.triton_topk_route if layer.backend == "triton" and not sampling else OPS.topk_route


def replayed(b: Builder, layer: MoELayerNode, route: tuple[fx.Node, fx.Node, fx.Node], logits_TE: fx.Node,
             inputs: dict[str, fx.Node], order: str, renormalize: bool,
             scale: float) -> tuple[fx.Node, fx.Node]:  # fmt: skip
    """``(weight_TK, idx_TK)`` of a top-k ``route`` (weight, idx, probs) after routing replay
    (``helpers.replay_route``: unchanged unless the layer is replaying a recording)."""
    from moespec.lower import helpers

    weight, idx, probs = route
    at = layer.router.origin
    node = b.fn(helpers.replay_route, weight, idx, logits_TE, probs, inputs["replay_idx_TK"],
                inputs["replay_w_TK"], order, renormalize, scale, origin=at)  # fmt: skip
    return b.item(node, 0, at, "weight_TK"), b.item(node, 1, at, "idx_TK")


def plain_topk(b: Builder, layer: MoELayerNode, logits_TE: fx.Node, k: int, renormalize: bool) -> fx.Node:
    """``moespec.topk_route`` as a plain softmax-then-top-k router: no expert bias, noise,
    groups or scaling; returns the op's node (weight_TK, idx_TK, probs_TE)."""
    empty = b.empty_like(logits_TE)
    return b.fn(
        topk_route_op(layer), logits_TE, empty, empty, k, "softmax", "softmax_then_topk", renormalize, 1.0,
        0, 0, "max", origin=layer.router.origin,
    )  # fmt: skip


def router_input(b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node]) -> fx.Node:
    """x in the router dtype (selective precision), times U(1 - eps, 1 + eps) while training
    when the router has input jitter (Switch; the draw is ``inputs["jitter_u_TD"]``)."""
    xr = b.to(x_TD, TORCH_DTYPES[layer.router.dtype])
    if JITTER.name in inputs:
        eps, at = layer.router.config.jitter, layer.router.origin
        scaled = b.fn(operator.mul, inputs[JITTER.name], 2.0 * eps, origin=at)
        xr = b.fn(operator.mul, xr, b.fn(operator.add, 1.0 - eps, scaled, origin=at), origin=at)
    return xr


def dense_slots(selected_TE: Tensor) -> Tensor:
    """idx_TE of the dense form: slot e of every token is expert e."""
    t, e = selected_TE.shape
    return torch.arange(e, device=selected_TE.device).expand(t, e)


LOWERINGS: KindTable[type[RouterLowering]] = KindTable("FX lowering", ROUTERS)
"""``@LOWERINGS.register("kind")`` on a router kind's :class:`RouterLowering` subclass."""


def lowering(layer: MoELayerNode) -> RouterLowering:
    """The lowering of ``layer``'s router kind (lowerings keep no state: a fresh instance)."""
    return LOWERINGS.get(layer.router.kind)()


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
