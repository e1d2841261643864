"""Reference routing statistics (observability; never differentiated).

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moespec.common.losses import score_distribution
from moespec.common.routing import RoutingResult
from moespec.common.sorted_routing import SortedRouting
from moespec.reference.capacity import CapacityResult


def router_entropy(p_TE: Tensor) -> float:
    """Mean over tokens of -sum_e p log p (nats); 0 log 0 = 0. ``p`` must sum to 1 per row."""
    p = p_TE.detach().to(torch.float64)
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return float(-plogp.sum(-1).mean()) if p.shape[0] else 0.0


def load_ratio(counts_E: Tensor) -> float:
    """max_e load / min_e load; inf when some expert got no tokens (and the max is > 0),
    nan when no expert got any."""
    hi, lo = float(counts_E.max()), float(counts_E.min())
    if lo == 0:
        return float("inf") if hi > 0 else float("nan")
    return hi / lo


@dataclass(frozen=True)
class LayerStats:
    """What one reference layer call did.

    ``tokens_per_expert`` counts computed rows (after capacity); ``routed_per_expert``
    counts the router's active selection before capacity (feed this one to
    ``update_expert_bias``). Entropy and load ratio describe the router (before capacity);
    the entropy is of the per-token score distribution (sigmoid scores renormalised to sum
    to 1, as for the balance loss).
    """

    routing: RoutingResult
    capacity: CapacityResult
    sorted: SortedRouting
    tokens_per_expert: Tensor
    routed_per_expert: Tensor
    dropped_fraction: float
    router_entropy: float
    load_ratio: float
    losses: dict[str, Tensor] = field(default_factory=dict)


def layer_stats(
    routing: RoutingResult, cap: CapacityResult, srt: SortedRouting, score: str, losses: dict[str, Tensor]
) -> LayerStats:
    """Collect :class:`LayerStats` from one layer call's intermediate results."""
    routed_E = routing.tokens_per_expert()
    return LayerStats(
        routing=routing,
        capacity=cap,
        sorted=srt,
        tokens_per_expert=srt.counts_E,
        routed_per_expert=routed_E,
        dropped_fraction=cap.dropped_fraction,
        router_entropy=router_entropy(score_distribution(routing.probs_TE, score)),
        load_ratio=load_ratio(routed_E),
        losses={k: v.detach() for k, v in losses.items()},
    )
