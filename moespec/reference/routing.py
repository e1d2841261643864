"""The reference's routing vocabulary in one place: the routing result and its constructors
(:mod:`moespec.common.routing`), the top-k router (:mod:`moespec.reference.routers.topk`)
and the aux-loss-free bias update (:mod:`moespec.common.controllers`)."""

from moespec.common.controllers import update_expert_bias
from moespec.common.routing import RoutingResult, dense_routing, token_choice_routing
from moespec.reference.routers import input_jitter
from moespec.reference.routers.topk import add_noise, route_topk, router_logits

__all__ = [
    "RoutingResult",
    "add_noise",
    "dense_routing",
    "input_jitter",
    "route_topk",
    "router_logits",
    "token_choice_routing",
    "update_expert_bias",
]
