"""Reference router functions, one module per router kind, registered by kind.

A reference router is ``fn(x_TD, params, spec, ctx) -> RoutingResult``: it reads its
parameters from ``params`` (names from the spec's :meth:`RouterSpec.params`), draws any
randomness from ``ctx.generator`` only, and returns the token-choice form (``K`` slots per
token) or the dense form K = E (:func:`~moespec.ops.reference.routing.dense_routing`) for
routers whose number of experts per token varies. Routers that mix tokens instead of
selecting them (Soft MoE) return a :class:`SoftRouting`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult
from moespec.spec.base import Strict


@dataclass(frozen=True)
class RouteContext:
    """What a reference router may read besides x and its parameters.

    ``inputs`` holds the layer's extra inputs (e.g. ``input_ids`` for hash routing),
    ``state`` the router's buffers as they are before this call (e.g. ReMoE's λ).
    ``seq_len`` is S for a 3-D input [B, S, D] (B sequences of S tokens), else None: routers
    that mix tokens per group (Soft MoE) route each sequence on its own."""

    n_experts: int
    training: bool
    generator: torch.Generator | None = None
    default_dtype: str = "fp32"
    inputs: dict[str, Tensor] = field(default_factory=dict)
    seq_len: int | None = None


@dataclass(frozen=True)
class SoftRouting:
    """A routing that mixes tokens into slots (Soft MoE): slot s of expert s // p takes
    ``dispatch_TS[:, s]``-weighted sums of tokens; token t takes ``combine_TS[t]``-weighted
    sums of slot outputs. ``logits_TS`` are the slot logits."""

    logits_TS: Tensor
    dispatch_TS: Tensor
    combine_TS: Tensor
    slots_per_expert: int
    n_experts: int


RefRouter = Callable[[Tensor, dict[str, Tensor], Strict, RouteContext], "RoutingResult | SoftRouting"]
REFERENCE_ROUTERS: dict[str, RefRouter] = {}


def reference_router(kind: str) -> Callable[[RefRouter], RefRouter]:
    """Register the reference function of router ``kind``."""

    def deco(fn: RefRouter) -> RefRouter:
        assert kind not in REFERENCE_ROUTERS, f"duplicate reference router {kind!r}"
        REFERENCE_ROUTERS[kind] = fn
        return fn

    return deco


def route(
    x_TD: Tensor, params: dict[str, Tensor], spec: Strict, ctx: RouteContext
) -> RoutingResult | SoftRouting:
    """Run the reference router of ``spec.kind``."""
    kind = spec.kind  # type: ignore[attr-defined]
    if kind not in REFERENCE_ROUTERS:
        raise NotImplementedError(f"router kind {kind!r} has no reference implementation")
    return REFERENCE_ROUTERS[kind](x_TD, params, spec, ctx)


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
