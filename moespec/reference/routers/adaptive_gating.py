"""Reference adaptive gating router (`kind: adaptive_gating`).

Source: Li et al. 2023, "Adaptive Gating in Mixture-of-Experts based Language Models"
(EMNLP 2023, arXiv:2310.07188); no code was released, this follows the paper's description
of a top-2 gate that falls back to top-1 on confident tokens.

    p_t        = softmax(x_t W_r^T)                     (router dtype)
    e1, e2     = the two most probable experts (ties to the lower index)
    use e2     ⇔ p_e1 − p_e2 ≤ threshold               (the token is "hard")
    weights    = kept:  p / (p_e1 + [use e2] p_e2)      (default; a top-1 token gets 1)
                 top2:  p / (p_e1 + p_e2)               (normalised before dropping e2)
                 raw:   p

Token-choice form with K = 2; ``active_TK[:, 1]`` says whether e2 is used, so capacity and
the balance losses see only the slots actually routed. `kept` is what the fairseq/DeepSpeed
``top2gating`` the method modifies computes when the second slot is masked out before the
gates are normalised (an assumption: the paper does not spell the weights out).

Shape legend: T tokens, D d_model, E experts, K = 2 slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.reference.selection import select_all
from moespec.spec.routers.adaptive_gating import AdaptiveGatingRouter


def adaptive_weights(p_TK: Tensor, use_second_T: Tensor, mode: str) -> Tensor:
    """Combine weights [T, 2] from the top-2 probabilities (see the module docstring)."""
    if mode == "raw":
        return p_TK
    if mode == "top2":
        return p_TK / p_TK.sum(-1, keepdim=True)
    denom_T1 = p_TK[:, :1] + torch.where(use_second_T, p_TK[:, 1], torch.zeros_like(p_TK[:, 1]))[:, None]
    return p_TK / denom_T1


@REFERENCE_ROUTERS.register("adaptive_gating")
def adaptive_gating(
    x_TD: Tensor, params: dict[str, Tensor], spec: AdaptiveGatingRouter, ctx: RouteContext
) -> RoutingResult:
    """Top-2 gating with a top-1 fallback (see the module docstring)."""
    _, logits_TE = linear_logits(x_TD, params, spec, ctx)
    probs_TE = logits_TE.softmax(-1)
    idx_TK = select_all(probs_TE, 2)
    p_TK = probs_TE.gather(1, idx_TK)
    use_second_T = (p_TK[:, 0] - p_TK[:, 1]).detach() <= spec.threshold
    active_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    active_TK[:, 1] = use_second_T
    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=logits_TE,
        noise_std_TE=None,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TK,
        topk_weight_TK=adaptive_weights(p_TK, use_second_T, spec.weights),
        active_TK=active_TK,
        n_experts=ctx.n_experts,
    )
