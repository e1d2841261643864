"""Stable top-k and group-limited selection masks, shared by the reference and the fast path.

Shape legend: T tokens, E experts, G expert groups, K top-k.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def stable_topk(values_TE: Tensor, k: int) -> Tensor:
    """Indices [T, k] of the k largest entries of each row, best first.

    Ties go to the lower expert index (a stable descending sort), which makes the oracle
    deterministic where ``torch.topk`` leaves tie order unspecified.
    """
    order_TE = torch.sort(values_TE, dim=-1, descending=True, stable=True).indices
    return order_TE[:, :k]


def group_limited_mask(
    crit_TE: Tensor, n_groups: int, topk_groups: int, group_score: Literal["top2_sum", "max"]
) -> Tensor:
    """Mask [T, E] (True = selectable) keeping each token's ``topk_groups`` best groups.

    Experts are split into ``n_groups`` contiguous equal groups; a group is scored by the sum
    of its two best criterion values (DeepSeek-V3, ``top2_sum``) or its best one
    (DeepSeek-V2, ``max``). Ties between groups go to the lower group index.
    """
    t_count, e_count = crit_TE.shape
    crit_TGe = crit_TE.reshape(t_count, n_groups, e_count // n_groups)
    best_TGe = torch.sort(crit_TGe, dim=-1, descending=True, stable=True).values
    score_TG = best_TGe[..., 0] + best_TGe[..., 1] if group_score == "top2_sum" else best_TGe[..., 0]
    kept_TG = torch.zeros(t_count, n_groups, dtype=torch.bool, device=crit_TE.device)
    kept_TG.scatter_(1, stable_topk(score_TG, topk_groups), True)
    return kept_TG.repeat_interleave(e_count // n_groups, dim=1)


def mask_unselected(crit_TE: Tensor, selectable_TE: Tensor) -> Tensor:
    """Set non-selectable entries to -inf.

    -inf (Megatron ``group_limited_topk``, torchtitan, the DeepSeek-V3 paper) rather than the
    0.0 fill of older HF DeepSeek-V3 code: with 0.0 a masked expert outranks kept ones
    whenever biased scores go negative, so it could be picked outside the kept groups.
    """
    return crit_TE.masked_fill(~selectable_TE, float("-inf"))
