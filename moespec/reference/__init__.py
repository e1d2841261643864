"""Plain-PyTorch reference semantics of everything a moespec layer spec can say.

This is the oracle the fast paths (fused custom ops, generated Triton) are tested against:
written from the formulas, loops where they make the math obvious, no performance goals. It
is a leaf: it imports only the spec models and the shared helpers (``moespec.common``: dtype
table, explicit random draws, stable top-k and group masks, capacity formulas, the routing
result, loss formulas, parameter init), and only tests and comparisons import it. Every
semantic choice where sources disagree is stated in the docstring of the module that makes it.

Modules: ``routers`` (one reference function per router kind, ``REFERENCE_ROUTERS``),
``selection`` (GShard second-expert selection), ``capacity``, ``experts`` (FFN/GLU, shared,
zero-compute), ``solvers`` (plain exact balanced assignment and Sinkhorn), ``stats``,
``params`` and ``routing`` (the names above under the reference's signatures), ``layer``
(the composition).
"""

from moespec.common.losses import (
    aux_losses,
    cv_squared,
    gshard_loss,
    smooth_load,
    switch_loss,
    z_loss,
)
from moespec.common.sorted_routing import SortedRouting, sort_by_expert
from moespec.reference.capacity import CapacityResult, apply_capacity, expert_capacity
from moespec.reference.experts import ACTIVATIONS, expert_forward, expert_table, ffn, shared_forward
from moespec.reference.layer import moe_layer_reference
from moespec.reference.params import BUFFERS, init_reference_params, param_shapes
from moespec.reference.routing import RoutingResult, route_topk, update_expert_bias
from moespec.reference.stats import LayerStats, load_ratio, router_entropy

__all__ = [
    "ACTIVATIONS",
    "BUFFERS",
    "CapacityResult",
    "LayerStats",
    "RoutingResult",
    "SortedRouting",
    "apply_capacity",
    "aux_losses",
    "cv_squared",
    "expert_capacity",
    "expert_forward",
    "expert_table",
    "ffn",
    "gshard_loss",
    "init_reference_params",
    "load_ratio",
    "moe_layer_reference",
    "param_shapes",
    "route_topk",
    "router_entropy",
    "shared_forward",
    "smooth_load",
    "sort_by_expert",
    "switch_loss",
    "update_expert_bias",
    "z_loss",
]
