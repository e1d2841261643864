"""`kind: topk`: the reference is :func:`moespec.ops.reference.routing.route_topk`."""

from __future__ import annotations

from torch import Tensor

from moespec.ops.reference.routers import RouteContext, reference_router
from moespec.ops.reference.routing import RoutingResult, route_topk
from moespec.spec.routers import TopKRouter


@reference_router("topk")
def topk(x_TD: Tensor, params: dict[str, Tensor], spec: TopKRouter, ctx: RouteContext) -> RoutingResult:
    """Token-choice top-k routing (see ``route_topk``)."""
    return route_topk(
        x_TD,
        params["router.weight"],
        spec,
        n_experts=ctx.n_experts,
        training=ctx.training,
        generator=ctx.generator,
        bias_E=params.get("router.bias"),
        expert_bias_E=params.get("router.expert_bias") if spec.expert_bias is not None else None,
        noise_w_ED=params.get("router.noise_weight"),
        default_dtype=ctx.default_dtype,
        residual_w_EE=params.get("router.residual_weight"),
        prev_logits_TE=ctx.inputs.get("prev_router_logits"),
    )
