"""Expert selection for token-choice routing: group-limited masking and GShard's
second-expert policies.

Selection works on a *criterion* tensor (what is ranked): the scores for
``softmax_then_topk`` and for sigmoid, the noisy logits for ``topk_then_softmax``, plus the
aux-loss-free expert bias when there is one. Weights are computed elsewhere, from the
unbiased scores.

Shape legend: T tokens, E experts, G expert groups, K top-k.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from moespec.ops.reference._common import gumbel, need_generator, stable_topk


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


def select_all(crit_TE: Tensor, k: int) -> Tensor:
    """Policy `all` (and plain top-k): the k best criterion values, best first [T, K]."""
    return stable_topk(crit_TE, k)


def select_second_by_sampling(
    crit_TE: Tensor, logits_TE: Tensor, selectable_TE: Tensor, generator: torch.Generator | None
) -> Tensor:
    """GShard policy `sampling` (k=2): e1 = best criterion; e2 = argmax(logits + Gumbel)
    over the selectable experts other than e1 — a draw from softmax(logits) restricted to
    them (fairscale/torchscale ``top2gating``). Returns [T, 2]."""
    gen = need_generator(generator, "second_expert_policy=sampling")
    first_T = stable_topk(crit_TE, 1)[:, 0]
    noisy_TE = logits_TE + gumbel(tuple(logits_TE.shape), gen, logits_TE)
    allowed_TE = selectable_TE.clone()
    allowed_TE[torch.arange(crit_TE.shape[0], device=crit_TE.device), first_T] = False
    second_T = stable_topk(mask_unselected(noisy_TE, allowed_TE), 1)[:, 0]
    return torch.stack([first_T, second_T], dim=1)
