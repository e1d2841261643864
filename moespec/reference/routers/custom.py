"""`kind: custom`: the user's function is its own reference; this module adapts its output
to a :class:`RoutingResult` exactly as the lowering does (softmax of its logits for the
balance losses; nonzero gates select in the dense form)."""

from __future__ import annotations

from torch import Tensor

from moespec.common.routing import RoutingResult, dense_routing, token_choice_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext
from moespec.spec.routers.custom import CustomRouter, call_custom


@REFERENCE_ROUTERS.register("custom")
def custom(x_TD: Tensor, params: dict[str, Tensor], spec: CustomRouter, ctx: RouteContext) -> RoutingResult:
    """Call ``spec.function(x_TD, router.weight, **spec.options)``."""
    out = call_custom(x_TD, params["router.weight"], spec.function, spec.output, spec.k, spec.options)
    logits_TE = out[0]
    probs_TE = logits_TE.softmax(-1)
    if spec.output == "dense":
        gates_TE = out[1]
        return dense_routing(logits_TE, probs_TE, gates_TE, gates_TE != 0, nominal_k=spec.k)
    weight_TK, idx_TK = out[1], out[2]
    return token_choice_routing(logits_TE, probs_TE, weight_TK, idx_TK, ctx.n_experts)
