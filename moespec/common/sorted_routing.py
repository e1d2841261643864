"""The central routing representation: routed rows sorted by expert, with offsets.

Every router reduces to ``(token_idx[N], expert_idx[N], weight[N])`` sorted by expert and
``offsets[E+1]`` (ARCHITECTURE.md). Rows of one expert are contiguous,
``offsets[e]:offsets[e+1]``, and within an expert they are in increasing token order (a
stable sort of the token-major (T, K) slot list; a token picks an expert at most once).

Shape legend: T tokens, K top-k, E experts, N routed rows (kept (token, expert) pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SortedRouting:
    """Routed rows sorted by expert (stable: by token within an expert).

    ``slot_N`` is the top-k rank k of each row (which choice of its token it was), kept so a
    row can be traced back to ``(token, k)``. Padded rows (see :meth:`padded`) have
    ``expert_idx == n_experts`` (the sentinel), token 0, weight 0 and slot -1, and sit after
    ``offsets[E]``.
    """

    token_idx_N: Tensor  # int64
    expert_idx_N: Tensor  # int64
    weight_N: Tensor  # router dtype, carries the gradient to the router
    slot_N: Tensor  # int64
    offsets_E1: Tensor  # int64, offsets[0] = 0, offsets[E] = rows in use
    n_experts: int

    @property
    def counts_E(self) -> Tensor:
        """Rows per expert (``offsets[1:] - offsets[:-1]``)."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def padded(self, n_max: int) -> SortedRouting:
        """The same routing in a fixed-size buffer of ``n_max`` rows (the build-time upper
        bound, e.g. T*K); unused rows point at the sentinel expert E and are skipped."""
        n = self.token_idx_N.numel()
        assert n <= n_max, f"{n} routed rows do not fit a buffer of {n_max}"
        pad = n_max - n
        long = {"dtype": torch.int64, "device": self.token_idx_N.device}
        return SortedRouting(
            token_idx_N=torch.cat([self.token_idx_N, torch.zeros(pad, **long)]),
            expert_idx_N=torch.cat([self.expert_idx_N, torch.full((pad,), self.n_experts, **long)]),
            weight_N=torch.cat([self.weight_N, self.weight_N.new_zeros(pad)]),
            slot_N=torch.cat([self.slot_N, torch.full((pad,), -1, **long)]),
            offsets_E1=self.offsets_E1,
            n_experts=self.n_experts,
        )


def sort_by_expert(
    topk_idx_TK: Tensor, topk_weight_TK: Tensor, keep_TK: Tensor, n_experts: int
) -> SortedRouting:
    """Build :class:`SortedRouting` from per-token choices, keeping only slots where ``keep_TK``.

    The (T, K) grid is flattened token-major, so a stable sort by expert leaves each
    expert's rows in token order.
    """
    t_count, k = topk_idx_TK.shape
    device = topk_idx_TK.device
    token_TK = torch.arange(t_count, device=device).unsqueeze(1).expand(t_count, k)
    slot_TK = torch.arange(k, device=device).unsqueeze(0).expand(t_count, k)
    keep = keep_TK.reshape(-1)
    expert = topk_idx_TK.reshape(-1)[keep]
    order = torch.sort(expert, stable=True).indices
    counts_E = torch.bincount(expert, minlength=n_experts)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)])
    return SortedRouting(
        token_idx_N=token_TK.reshape(-1)[keep][order],
        expert_idx_N=expert[order],
        weight_N=topk_weight_TK.reshape(-1)[keep][order],
        slot_N=slot_TK.reshape(-1)[keep][order],
        offsets_E1=offsets_E1,
        n_experts=n_experts,
    )
