"""The routing result every token-choice and dense-form router returns, and its two
plain constructors. Shared by the reference routers and the fast path's loss node.

Shape legend: T tokens, E experts (routable, zero-compute included), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.common.sorted_routing import SortedRouting, sort_by_expert


@dataclass(frozen=True)
class RoutingResult:
    """What a top-k router decided for T tokens.

    - ``logits_TE``: clean logits (x W_r^T + b) / temperature — jitter included, noise not;
      the z-loss and the smooth load estimator use these.
    - ``noisy_logits_TE``: the logits the scores came from (== ``logits_TE`` without noise).
    - ``noise_std_TE``: per-entry std of the logit noise actually added, else None.
    - ``probs_TE``: softmax or sigmoid scores over all experts (from the noisy logits).
    - ``topk_idx_TK``: chosen experts, best first (for `sampling`, the sampled one second).
    - ``topk_weight_TK``: combine weights (renormalised / softmaxed, times scaling_factor).
    - ``active_TK``: False where GShard's `random` policy dropped the second expert.
    - ``nominal_k``: the k the balance losses normalise by, when it is not ``K`` (routers
      with a data-dependent number of experts per token use the dense form K = E, see
      :func:`dense_routing`).
    - ``extra_loss``: a router-specific weighted loss added to the layer's ``aux_loss``
      (e.g. ReMoE's L1 term), or None.
    - ``residual_TD``: a [T, D] term added to the layer's output (BASE's (1 - α)·x mix),
      or None.
    """

    logits_TE: Tensor
    noisy_logits_TE: Tensor
    noise_std_TE: Tensor | None
    probs_TE: Tensor
    topk_idx_TK: Tensor
    topk_weight_TK: Tensor
    active_TK: Tensor
    n_experts: int
    nominal_k: int | None = None
    extra_loss: Tensor | None = None
    residual_TD: Tensor | None = None

    @property
    def k(self) -> int:
        """Slots per token (the nominal k of a dense-form routing)."""
        return self.nominal_k if self.nominal_k is not None else self.topk_idx_TK.shape[1]

    def selected_TE(self, keep_TK: Tensor | None = None) -> Tensor:
        """Bool [T, E]: token t routed to expert e (active slots, further masked by keep)."""
        keep = self.active_TK if keep_TK is None else keep_TK & self.active_TK
        out = torch.zeros(self.topk_idx_TK.shape[0], self.n_experts, dtype=torch.bool, device=keep.device)
        return out.scatter(1, self.topk_idx_TK, keep)

    def gates_TE(self) -> Tensor:
        """Dense combine weights [T, E] (zero off the active selection); differentiable."""
        w_TK = self.topk_weight_TK * self.active_TK.to(self.topk_weight_TK.dtype)
        out = self.topk_weight_TK.new_zeros(self.topk_idx_TK.shape[0], self.n_experts)
        return out.scatter(1, self.topk_idx_TK, w_TK)

    def tokens_per_expert(self, keep_TK: Tensor | None = None) -> Tensor:
        """int64 [E]: routed (token, expert) pairs per expert."""
        return self.selected_TE(keep_TK).sum(0)

    def to_sorted(self, keep_TK: Tensor | None = None) -> SortedRouting:
        """The central representation (rows sorted by expert, offsets[E+1]) of the active
        slots, optionally restricted to ``keep_TK`` (capacity)."""
        keep = self.active_TK if keep_TK is None else keep_TK & self.active_TK
        return sort_by_expert(self.topk_idx_TK, self.topk_weight_TK, keep, self.n_experts)


def token_choice_routing(
    logits_TE: Tensor, probs_TE: Tensor, weight_TK: Tensor, idx_TK: Tensor, n_experts: int
) -> RoutingResult:
    """A plain token-choice routing: K chosen experts per token, no noise, every slot active."""
    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=logits_TE,
        noise_std_TE=None,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TK,
        topk_weight_TK=weight_TK,
        active_TK=torch.ones_like(idx_TK, dtype=torch.bool),
        n_experts=n_experts,
    )


def dense_routing(
    logits_TE: Tensor,
    probs_TE: Tensor,
    gates_TE: Tensor,
    selected_TE: Tensor,
    *,
    nominal_k: int,
    extra_loss: Tensor | None = None,
) -> RoutingResult:
    """A routing where each token may use any number of experts, in the dense form K = E:
    slot e of token t is expert e, active where ``selected_TE``, weighing ``gates_TE``."""
    t_count, n_experts = logits_TE.shape
    idx_TE = torch.arange(n_experts, device=logits_TE.device).expand(t_count, n_experts)
    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=logits_TE,
        noise_std_TE=None,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TE,
        topk_weight_TK=gates_TE,
        active_TK=selected_TE,
        n_experts=n_experts,
        nominal_k=nominal_k,
        extra_loss=extra_loss,
    )
