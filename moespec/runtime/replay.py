"""Routing replay ("R3"): record the experts each token chose in one pass, force the same
choice in another.

Legend: T tokens, K experts per token.

``moespec.record_routing(model)`` stores, per MoE layer (by its name in ``model``) and per
call, the chosen experts ``idx_TK`` (int64, before capacity: the router's choice; the
tensors stay where they are, no host sync), and with ``weights=True`` their combine weights.
``moespec.replay_routing(model, recording)`` makes the same layers route each call as the
recording's call of the same index: the recorded experts, weighted by the current router as
it weighs its own choice (so the router still gets gradients; ``weights="router"``, the
default) or by the recorded weights (``weights="recorded"``). Capacity and drop policies apply
to the replayed choice as to a fresh one. A recording made on one model replays on another
with the same layer names and expert counts (an RL rollout's inference model, say).

Routers that replay: ``kind: topk`` (Mixtral, Switch, GShard, DeepSeek, Qwen, OLMoE, ...),
``kind: cosine`` (X-MoE), ``kind: sinkhorn``, ``kind: hash`` (the recorded experts instead of
the table's, weighted 1/k), ``kind: base`` (the recorded experts instead of the balanced
assignment, which then does not run; the sigmoid gate of the current centroids), and the
routers whose number of experts varies per token, whose recordings mark a token's unused
slots -1: ``kind: top_p``, ``relu`` (ReMoE), ``dselect_k`` (all over every expert, the
router's own gates restricted to the recorded ones, renormalised where the router
renormalises) and ``adaptive_gating`` (two slots).
Soft MoE has no per-token choice to replay; the other router kinds are refused with an
error naming them until their lowering supports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moespec.lower.routers import lowering

if TYPE_CHECKING:
    from moespec.runtime.layer import MoELayer

_TAP = "_routing_tap"  # the layer attribute a recording or a replay hangs on


@dataclass
class RoutingRecording:
    """The recorded routing: ``experts[name][i]`` is layer ``name``'s choice [T, K] in its
    i-th call (``weights`` likewise when recorded with ``weights=True``, else empty)."""

    experts: dict[str, list[Tensor]] = field(default_factory=dict)
    weights: dict[str, list[Tensor]] = field(default_factory=dict)


class _Recorder:
    def __init__(self, rec: RoutingRecording, name: str, with_weights: bool) -> None:
        self.rec, self.name, self.with_weights = rec, name, with_weights
        rec.experts.setdefault(name, [])
        if with_weights:
            rec.weights.setdefault(name, [])

    def inputs(self, x_TD: Tensor, rows: int) -> list[Tensor]:
        return _none(x_TD)

    def after(self, idx_TK: Tensor, weight_TK: Tensor) -> None:
        if _recomputing():  # activation checkpointing's rerun of a recorded call
            return
        self.rec.experts[self.name].append(idx_TK.detach())
        if self.with_weights:
            self.rec.weights[self.name].append(weight_TK.detach())


class _Replayer:
    def __init__(self, rec: RoutingRecording, name: str, recorded_weights: bool) -> None:
        self.rec, self.name, self.recorded_weights, self.calls = rec, name, recorded_weights, 0

    def inputs(self, x_TD: Tensor, rows: int) -> list[Tensor]:
        if _recomputing():
            raise RuntimeError(
                f"routing replay: layer {self.name!r} is recomputed in backward (activation "
                "checkpointing), which routing replay does not support yet: replay without "
                "checkpointing the MoE layers"
            )
        calls = self.rec.experts[self.name]
        if self.calls >= len(calls):
            raise RuntimeError(
                f"routing replay: layer {self.name!r} is called {self.calls + 1} times, but the "
                f"recording holds {len(calls)} call(s) of it"
            )
        idx_TK = calls[self.calls]
        if idx_TK.shape[0] != rows:
            raise ValueError(
                f"routing replay: call {self.calls} of layer {self.name!r} routes {rows} rows, "
                f"the recording {idx_TK.shape[0]}"
            )
        w_TK = self.rec.weights[self.name][self.calls] if self.recorded_weights else None
        self.calls += 1
        empty = x_TD.new_empty(0)
        return [idx_TK.to(x_TD.device), empty if w_TK is None else w_TK.to(x_TD.device)]

    def after(self, idx_TK: Tensor, weight_TK: Tensor) -> None:
        pass


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass (eager activation checkpointing; a
    compiled graph is traced once, outside any backward)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _none(x_TD: Tensor) -> list[Tensor]:
    return [x_TD.new_empty(0, dtype=torch.int64), x_TD.new_empty(0)]


def routing_inputs(layer: MoELayer, x_TD: Tensor) -> list[Tensor]:
    """The replay inputs of a layer's graph for this call (empty tensors: route as usual); the
    router routes ``heads`` rows per token (multi-head MoE's sub-tokens)."""
    tap = layer.__dict__.get(_TAP)
    return _none(x_TD) if tap is None else tap.inputs(x_TD, x_TD.shape[0] * layer.ir.heads)


def after_call(layer: MoELayer, idx_TK: Tensor | None, weight_TK: Tensor | None) -> None:
    """Hand a call's choice to the layer's recording, if any."""
    tap = layer.__dict__.get(_TAP)
    if tap is not None and idx_TK is not None:
        tap.after(idx_TK, weight_TK)


# Router kinds where replaying a per-token choice has no meaning, and why.
_NO_REPLAY = {
    "soft_moe": "has no per-token choice to replay",
    "expert_choice": (
        "chooses tokens per expert, not experts per token: routing replay covers token-choice routers"
    ),
}


def _replaying_kinds() -> list[str]:
    from moespec.lower.routers import LOWERINGS

    return sorted(kind for kind, low in LOWERINGS.items.items() if low.replay)


def _layers(model: nn.Module) -> dict[str, MoELayer]:
    from moespec.runtime.layer import MoELayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    if not layers:
        raise ValueError("routing replay: the model holds no moespec MoE layer")
    for name, m in layers.items():
        if not lowering(m.ir).replay:
            what = _NO_REPLAY.get(
                m.ir.router.kind,
                f"does not support routing replay yet (kinds {', '.join(_replaying_kinds())} do)",
            )
            raise ValueError(
                f"routing replay: layer {name or '<model>'!r} ({m.ir.router.kind} router) {what}"
            )
        if m.__dict__.get(_TAP) is not None:
            raise RuntimeError(
                f"routing replay: layer {name or '<model>'!r} is already recording or replaying"
            )
    return layers


@contextmanager
def _tapped(layers: dict[str, MoELayer], taps: dict[str, object]) -> Iterator[None]:
    try:
        for name, layer in layers.items():
            layer.__dict__[_TAP] = taps[name]
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop(_TAP, None)


@contextmanager
def record_routing(model: nn.Module, *, weights: bool = False) -> Iterator[RoutingRecording]:
    """Record every MoE layer's routing inside the block (see the module docstring)."""
    layers = _layers(model)
    rec = RoutingRecording()
    with _tapped(layers, {name: _Recorder(rec, name, weights) for name in layers}):
        yield rec


@contextmanager
def replay_routing(
    model: nn.Module, recording: RoutingRecording, *, weights: str = "router"
) -> Iterator[None]:
    """Route every MoE layer inside the block as ``recording`` did, call by call (see the
    module docstring); ``weights`` is ``"router"`` or ``"recorded"``."""
    if weights not in ("router", "recorded"):
        raise ValueError(f"routing replay: weights must be 'router' or 'recorded', not {weights!r}")
    layers = _layers(model)
    missing = sorted(set(layers) - set(recording.experts))
    extra = sorted(set(recording.experts) - set(layers))
    if missing or extra:
        raise ValueError(
            f"routing replay: the recording's layers {sorted(recording.experts)} do not match the model's "
            f"{sorted(layers)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unknown {extra})" if extra else "")
        )
    if weights == "recorded" and set(recording.weights) != set(layers):
        raise ValueError("routing replay: weights='recorded' needs a recording made with weights=True")
    if weights == "recorded":
        for name, layer in layers.items():
            if any(getattr(s, "param", None) == "router.k" for s in layer.ir.schedules):
                raise ValueError(
                    f"routing replay: layer {name!r} schedules router.k, which recomputes the weights "
                    "of the kept experts: weights='recorded' cannot hold there (use weights='router')"
                )
    for name, layer in layers.items():
        k = lowering(layer.ir).replay_k(layer.ir)
        got = {tuple(t.shape[1:]) for t in recording.experts[name]}
        if k is not None and got - {(k,)}:
            raise ValueError(
                f"routing replay: layer {name!r} routes to k={k} experts, the recording to {got}"
            )
        for call, t in enumerate(recording.experts[name]):
            if (problem := lowering(layer.ir).replay_problem(layer.ir, t)) is not None:
                raise ValueError(f"routing replay: the recording of layer {name!r} (call {call}) {problem}")
    with _tapped(layers, {name: _Replayer(recording, name, weights == "recorded") for name in layers}):
        yield
