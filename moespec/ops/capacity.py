"""``moespec::capacity_keep``: which routed slots fit in each expert's capacity.

Legend: T tokens, K slots per token, E experts.

C = max(ceil(factor · T · K / E), min_capacity). Slots are served in priority order and an
expert keeps its first C active slots. Priorities follow the reference
(moespec.reference.capacity; C is moespec.common.capacity's formula): ``position``
serves all first choices before any second choice, earliest token first; ``score`` serves
the highest weight first, slot by slot (position order on ties); ``batch_priority`` serves
all first choices before any second choice, tokens ordered by their largest weight (V-MoE's
BPR); ``random`` serves in the order of
``u_TK`` (uniform draws given as input, so the op is pure). Vectorised: no per-expert
loop. C is computed inside the op from T, so an exported graph stays valid for any number
of tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.capacity import expert_capacity


def _order(weight_TK: Tensor, u_TK: Tensor, policy: str) -> Tensor:
    t, k = weight_TK.shape
    # k-major position order: slot (t, j) is served at j*T + t.
    by_position = torch.arange(t * k, device=weight_TK.device).reshape(k, t).t().reshape(-1)
    by_position = torch.argsort(by_position)
    if policy == "position":
        return by_position
    if policy == "score":
        w = weight_TK.detach().reshape(-1)[by_position]
        return by_position[torch.sort(w, descending=True, stable=True).indices]
    if policy == "batch_priority":
        # Tokens by top weight, highest first (stable: position on ties); rank j of every token
        # in that order before rank j+1. Flat slot (t, j) is t*K + j.
        token_order_T = torch.sort(weight_TK.detach().amax(dim=1), descending=True, stable=True).indices
        rank_K = torch.arange(k, device=weight_TK.device)
        return (token_order_T.unsqueeze(0) * k + rank_K.unsqueeze(1)).reshape(-1)
    if policy == "random":
        return torch.sort(u_TK.reshape(-1), stable=True).indices
    raise ValueError(f"unknown drop policy {policy!r}")


@torch.library.custom_op("moespec::capacity_keep", mutates_args=())
def capacity_keep(
    idx_TK: Tensor,
    weight_TK: Tensor,
    active_TK: Tensor,
    u_TK: Tensor,
    n_experts: int,
    factor: float,
    min_capacity: int,
    policy: str,
) -> Tensor:
    """Bool [T, K]: slot kept (active and within its expert's first C in priority order)."""
    t, k = idx_TK.shape
    cap = expert_capacity(factor, t, k, n_experts, min_capacity)
    order_S = _order(weight_TK, u_TK, policy)
    active_S = active_TK.reshape(-1)[order_S]
    # Inactive slots go to a sentinel expert so they take no capacity.
    expert_S = torch.where(active_S, idx_TK.reshape(-1)[order_S], n_experts)
    by_expert = torch.argsort(expert_S, stable=True)  # priority order kept within an expert
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx_TK.device)
    counts.scatter_add_(0, expert_S, torch.ones_like(expert_S))
    start = torch.cumsum(counts, 0) - counts
    sorted_expert = expert_S[by_expert]
    rank_in_expert = torch.arange(t * k, device=idx_TK.device) - start[sorted_expert]
    kept_sorted = (rank_in_expert < cap) & (sorted_expert < n_experts)
    keep = torch.zeros(t * k, dtype=torch.bool, device=idx_TK.device)
    keep[order_S[by_expert]] = kept_sorted
    return keep.reshape(t, k)


@capacity_keep.register_fake
def _(idx_TK, weight_TK, active_TK, u_TK, n_experts, factor, min_capacity, policy):
    return torch.empty_like(idx_TK, dtype=torch.bool)
