"""Reference capacity (token dropping): `dropless` and `factor` with four drop policies.

C = max(ceil(factor * T * k / E), min_capacity), factor = train_factor while training and
eval_factor otherwise, with E every routable expert (zero-compute ones included; they take
routing slots like the others). Each expert keeps at most C of the (token, k) slots routed to
it, chosen by a priority order over all slots:

- `position`: top-1 choices of every token first, then top-2 choices, ... and by token
  position inside each rank (GShard Algorithm 2, fairscale ``top2gating``, flaxformer: the
  cumsum runs over k-major slots) — an early token's second choice loses to a late token's
  first choice;
- `score`: each slot by its own routing weight, highest first, ties broken by the `position`
  order (a token's second choice can displace another token's first choice);
- `batch_priority`: V-MoE's Batch Priority Routing (Riquelme et al. 2021, vmoe's
  ``batch_priority``): tokens sorted by their largest routing weight, highest first (ties by
  position), then every token's first choice in that order, then every second choice, ...;
- `random`: a uniformly random order (one U(0,1) per slot from the generator).

Slots already switched off by the router (GShard `random` second expert) never use capacity.
A dropped slot contributes nothing (the token keeps its residual / shared path).

Shape legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.common.capacity import capacity_factor, expert_capacity
from moespec.common.rng import need_generator, uniform
from moespec.common.routing import RoutingResult
from moespec.spec.sparsity import CapacityFactor, Dropless

__all__ = ["CapacityResult", "apply_capacity", "expert_capacity", "slot_priority"]


@dataclass(frozen=True)
class CapacityResult:
    """Which routed slots survive capacity.

    ``keep_TK`` is True for slots that are computed (always within ``active_TK``);
    ``capacity`` is C (None when dropless); ``dropped_fraction`` = dropped / active slots.
    """

    keep_TK: Tensor
    capacity: int | None
    n_dropped: int
    dropped_fraction: float


def slot_priority(routing: RoutingResult, policy: str, generator: torch.Generator | None) -> Tensor:
    """Rank [T, K] of every slot (0 = served first) under a drop policy."""
    t_count, k = routing.topk_idx_TK.shape
    device = routing.topk_idx_TK.device
    # k-major position order: slot (t, j) comes at j*T + t.
    rank_K = torch.arange(k, device=device).unsqueeze(0)
    position_TK = rank_K * t_count + torch.arange(t_count, device=device).unsqueeze(1)
    by_position = torch.argsort(position_TK.reshape(-1))  # flat (t, j) indices, k-major
    if policy == "position":
        order = by_position
    elif policy == "score":
        # Stable descending sort by weight of the position-ordered slots: highest weight
        # first, position order on ties. NaN weights sort first and are simply served first.
        w_pos = routing.topk_weight_TK.detach().reshape(-1)[by_position]
        order = by_position[torch.sort(w_pos, descending=True, stable=True).indices]
    elif policy == "batch_priority":
        # Token order by the top routing weight (stable: earlier token first on ties); slot
        # (t, j) is served at j*T + (t's place in that order).
        top_T = routing.topk_weight_TK.detach().amax(dim=1)
        place_T = torch.empty(t_count, dtype=torch.int64, device=device)
        place_T[torch.sort(top_T, descending=True, stable=True).indices] = torch.arange(
            t_count, device=device
        )
        order = torch.argsort((rank_K * t_count + place_T.unsqueeze(1)).reshape(-1))
    elif policy == "random":
        gen = need_generator(generator, "drop_policy=random")
        u = uniform((t_count * k,), gen, routing.topk_weight_TK.new_empty(0, dtype=torch.float32))
        order = torch.sort(u, stable=True).indices
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    rank = torch.empty(t_count * k, dtype=torch.int64, device=device)
    rank[order] = torch.arange(t_count * k, device=device)
    return rank.reshape(t_count, k)


def apply_capacity(
    routing: RoutingResult,
    spec: CapacityFactor | Dropless,
    *,
    training: bool,
    generator: torch.Generator | None = None,
) -> CapacityResult:
    """Keep at most C slots per expert (``factor``), or every active slot (``dropless``)."""
    active_TK = routing.active_TK
    n_active = int(active_TK.sum())
    if spec.kind == "dropless":
        return CapacityResult(keep_TK=active_TK.clone(), capacity=None, n_dropped=0, dropped_fraction=0.0)
    t_count, k = routing.topk_idx_TK.shape
    cap = expert_capacity(capacity_factor(spec, training), t_count, k, routing.n_experts, spec.min_capacity)
    rank_TK = slot_priority(routing, spec.drop_policy, generator)

    keep_TK = torch.zeros_like(active_TK)
    flat_keep = keep_TK.view(-1)
    flat_idx, flat_rank = routing.topk_idx_TK.reshape(-1), rank_TK.reshape(-1)
    flat_active = active_TK.reshape(-1)
    for e in range(routing.n_experts):
        # This expert's active slots, in priority order; the first C are served.
        slots = torch.nonzero((flat_idx == e) & flat_active).flatten()
        served = slots[torch.argsort(flat_rank[slots])][:cap]
        flat_keep[served] = True
    n_dropped = n_active - int(keep_TK.sum())
    frac = n_dropped / n_active if n_active else 0.0
    return CapacityResult(keep_TK=keep_TK, capacity=cap, n_dropped=n_dropped, dropped_fraction=frac)
