"""``moespec::sort_by_expert``: the dispatch in front of the grouped expert GEMMs.

Legend: T tokens, K selections per token, E experts, N = T*K routed rows.

sort_by_expert turns per-token choices ``idx_TK`` (and a keep mask from capacity) into the
central routing result of ARCHITECTURE.md: rows sorted by expert (stable, so tokens keep
their order inside an expert), dropped rows moved to the end under the sentinel expert E,
and ``offsets_E1`` with offsets[E] = kept rows. Shapes are static (N = T*K), so the op needs
no dynamic-size fake and exports with a dynamic T. The combine (weighted rows summed back per
token, y[t] = sum_n [token_idx[n] = t] w[n] h[n]) is fused into ``moespec::expert_ffn_combine``.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("moespec::sort_by_expert", mutates_args=())
def sort_by_expert(idx_TK: Tensor, keep_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(token_idx_N, slot_N, offsets_E1)``; ``slot_N`` indexes the flattened [T*K]
    choices (to gather weights), ``offsets_E1`` is int64 with offsets[0] = 0."""
    k = idx_TK.shape[1]
    expert_N = torch.where(keep_TK, idx_TK, n_experts).reshape(-1)
    slot_N = torch.argsort(expert_N, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx_TK.device)
    counts.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx_TK.device)
    offsets_E1[1:] = torch.cumsum(counts[:n_experts], 0)
    return torch.div(slot_N, k, rounding_mode="floor"), slot_N, offsets_E1


@sort_by_expert.register_fake
def _(idx_TK, keep_TK, n_experts):
    n = idx_TK.shape[0] * idx_TK.shape[1]
    i64 = dict(dtype=torch.int64, device=idx_TK.device)
    return idx_TK.new_empty(n, **i64), idx_TK.new_empty(n, **i64), idx_TK.new_empty(n_experts + 1, **i64)
