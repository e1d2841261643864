"""Reference router functions, one module per router kind, registered by kind.

A reference router is ``fn(x_TD, params, spec, ctx) -> RoutingResult``: it reads its
parameters from ``params`` (names from the spec's :meth:`RouterSpec.params`), draws any
randomness from ``ctx.generator`` only, and returns the token-choice form (``K`` slots per
token) or the dense form K = E (:func:`~moespec.reference.routing.dense_routing`) for
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

from moespec.common.dtypes import TORCH_DTYPES
from moespec.common.rng import need_generator, uniform
from moespec.common.routing import RoutingResult
from moespec.spec.base import KindTable, Strict
from moespec.spec.routers import ROUTERS, RouterSpec


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
REFERENCE_ROUTERS: KindTable[RefRouter] = KindTable("reference router", ROUTERS)
"""``@REFERENCE_ROUTERS.register("kind")`` on a router kind's reference function."""


def route(
    x_TD: Tensor, params: dict[str, Tensor], spec: Strict, ctx: RouteContext
) -> RoutingResult | SoftRouting:
    """Run the reference router of ``spec.kind``."""
    return REFERENCE_ROUTERS.get(spec.kind)(x_TD, params, spec, ctx)  # type: ignore[attr-defined]


def input_jitter(x_TD: Tensor, eps: float, *, training: bool, generator: torch.Generator | None) -> Tensor:
    """Switch input jitter while training: x * U(1 - eps, 1 + eps), one draw per entry of x
    from ``generator``; x unchanged in eval or with eps = 0."""
    if not training or eps <= 0:
        return x_TD
    u_TD = uniform(tuple(x_TD.shape), need_generator(generator, "router jitter"), x_TD)
    return x_TD * (1.0 - eps + 2.0 * eps * u_TD)


def router_dtype(spec: RouterSpec, ctx: RouteContext) -> torch.dtype:
    """The router's compute dtype: its own ``dtype`` field, else ``target.router_dtype``."""
    return TORCH_DTYPES[spec.own_dtype or ctx.default_dtype]


def linear_logits(
    x_TD: Tensor,
    params: dict[str, Tensor],
    spec: RouterSpec,
    ctx: RouteContext,
    weight: str = "router.weight",
    bias: str | None = None,
    jitter: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The opening most routers share: ``(x_r_TD, logits_TE)`` with x_r = x in the router
    dtype, times U(1 - jitter, 1 + jitter) while training when ``jitter`` > 0 (Switch; one
    draw per entry from ``ctx.generator``), and logits = x_r W^T (+ b), W = ``params[weight]``,
    b = ``params[bias]`` when named, both cast to the router dtype."""
    dtype = router_dtype(spec, ctx)
    x_TD = input_jitter(x_TD.to(dtype), jitter, training=ctx.training, generator=ctx.generator)
    logits_TE = x_TD @ params[weight].to(dtype).T
    if bias is not None:
        logits_TE = logits_TE + params[bias].to(dtype)
    return x_TD, logits_TE


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
