"""Reference expert-choice router (`kind: expert_choice`).

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368, §3.2;
code: flaxformer ``routing.ExpertsChooseMaskedRouter`` and ``moe_layers.MoeLayer``.

    logits = x W_r^T (+ b)                       [T, E], in the router dtype
    S      = softmax(logits) over experts        (paper: S = Softmax(X · W_g))
    per routing group g of T_g tokens and per expert e:
        I_e = the C tokens of g with the largest S[:, e]   (paper: G, I = TopK(S^T, k))
    C      = min(max(round(cf · T_g / E), min_capacity), T_g)
    gates[t, e] = S[t, e] if t ∈ I_e else 0;   y_t = Σ_e gates[t, e] · f_e(x_t)

Choices where the sources differ or are silent:
- C: the paper writes k = n·c/e; we follow flaxformer, ``max(int(round(cf · T_g / E)),
  min_expert_capacity)`` (Python's round: half to even), and cap C at T_g (flaxformer's
  ``top_k`` would fail for C > T_g; taking every token is the natural limit).
- Groups: flaxformer reshapes the tokens into groups of equal size (``max_group_size``);
  we route consecutive groups of ``group_size`` tokens and let the last group be shorter
  (its C from its own length); no group size = the whole call is one group.
- Ties (equal S[t, e], e.g. identical padding tokens): the lower token index wins, a stable
  descending sort; ``jax.lax.top_k`` resolves ties the same way.
- No jitter, no padding mask, no balancing loss (flaxformer returns auxiliary_loss 0); the
  router z-loss of the layer's ``losses`` still applies to the logits.

Shape legend: T tokens, D d_model, E experts, C tokens per expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.capacity import expert_choice_capacity
from moespec.common.routing import RoutingResult, dense_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.spec.routers.expert_choice import ExpertChoiceRouter


def select_group(scores_TE: Tensor, capacity: int) -> Tensor:
    """Bool [T, E]: expert e takes the ``capacity`` tokens with the largest ``scores_TE[:, e]``,
    ties to the lower token index."""
    selected_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    for e in range(scores_TE.shape[1]):
        order_T = torch.sort(scores_TE[:, e], descending=True, stable=True).indices
        selected_TE[order_T[:capacity], e] = True
    return selected_TE


def expert_choice_selection(
    scores_TE: Tensor, capacity_factor: float, min_capacity: int, group_size: int | None
) -> Tensor:
    """Bool [T, E] selection of every group (consecutive ``group_size`` tokens; None: one
    group of all T tokens)."""
    t_count, n_experts = scores_TE.shape
    size = group_size or max(t_count, 1)
    selected_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    for lo in range(0, t_count, size):
        group_TE = scores_TE[lo : lo + size]
        c = expert_choice_capacity(group_TE.shape[0], n_experts, capacity_factor, min_capacity)
        selected_TE[lo : lo + size] = select_group(group_TE, c)
    return selected_TE


@REFERENCE_ROUTERS.register("expert_choice")
def expert_choice(
    x_TD: Tensor, params: dict[str, Tensor], spec: ExpertChoiceRouter, ctx: RouteContext
) -> RoutingResult:
    """Expert-choice routing in the dense form (see the module docstring)."""
    bias = "router.bias" if "router.bias" in params else None
    _, logits_TE = linear_logits(x_TD, params, spec, ctx, bias=bias)
    probs_TE = logits_TE.softmax(-1)
    cf = spec.factor(ctx.training)
    # The choice itself is not differentiable; gradients reach the router through S[t, e].
    selected_TE = expert_choice_selection(probs_TE.detach(), cf, spec.min_capacity, spec.group_size)
    gates_TE = probs_TE * selected_TE.to(probs_TE.dtype)
    nominal_k = max(1, round(min(cf, ctx.n_experts)))
    return dense_routing(logits_TE, probs_TE, gates_TE, selected_TE, nominal_k=nominal_k)
