"""Expert selection for token-choice routing: group-limited masking and GShard's
second-expert policies.

Selection works on a *criterion* tensor (what is ranked): the scores for
``softmax_then_topk`` and for sigmoid, the noisy logits for ``topk_then_softmax``, plus the
aux-loss-free expert bias when there is one. Weights are computed elsewhere, from the
unbiased scores.

Shape legend: T tokens, E experts, G expert groups, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.rng import gumbel, need_generator
from moespec.common.select import group_limited_mask, mask_unselected, stable_topk

__all__ = ["group_limited_mask", "mask_unselected", "select_all", "select_second_by_sampling"]


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
