"""Reference dynamic top-p router (`kind: top_p`).

Source: Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(arXiv:2403.07652); ZhenweiAn/Dynamic_MoE ``top_p_sampling_batched_all_sequence`` and
``SwitchMLP`` (an inference-only release).

    p_t     = softmax(x_t W_r^T)                        (router dtype)
    order   = experts by decreasing p_t, ties to the lower index (stable sort)
    keep j  ⇔ Σ_{i<j} p_(i) < τ  (and j < max_k)       j-th expert in that order
    gate_te = p_te where kept (/ Σ kept p_te if renormalize), 0 elsewhere
    dynamic loss = entropy_weight · mean_t(−Σ_e p_te log p_te)   (the routing's extra_loss)

"keep j iff the experts before it have not reached τ" is the smallest prefix whose sum
reaches τ, the crossing expert included. The paper's criterion is Σ ≥ τ; the released code
tests ``cumsum > τ``; they differ only when a prefix sums to exactly τ (here it stops there).
The code does not renormalise the kept probabilities (default here too). The entropy uses
log_softmax so a probability that underflows to 0 contributes 0, not NaN.

Shape legend: T tokens, D d_model, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult, dense_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.spec.routers.top_p import TopPRouter


def top_p_mask(probs_TE: Tensor, threshold: float, max_k: int | None = None) -> Tensor:
    """Bool [T, E]: the smallest prefix of each row's experts, by decreasing probability
    (ties to the lower index), whose probabilities sum to at least ``threshold``; at most
    ``max_k`` experts."""
    t_count, n_experts = probs_TE.shape
    sorted_TE, order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    cum_TE = torch.cumsum(sorted_TE, dim=-1)
    # Sum of the experts strictly before each position (0 for the best one).
    before_TE = torch.cat([torch.zeros_like(cum_TE[:, :1]), cum_TE[:, :-1]], dim=-1)
    keep_sorted_TE = before_TE < threshold
    if max_k is not None:
        keep_sorted_TE[:, max_k:] = False
    selected_TE = torch.zeros(t_count, n_experts, dtype=torch.bool, device=probs_TE.device)
    return selected_TE.scatter(1, order_TE, keep_sorted_TE)


def mean_entropy(logits_TE: Tensor) -> Tensor:
    """mean_t(−Σ_e p_te log p_te) with p = softmax(logits); 0 for no tokens."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    logp_TE = logits_TE.log_softmax(-1)
    return -(logp_TE.exp() * logp_TE).sum(-1).mean()


@REFERENCE_ROUTERS.register("top_p")
def top_p(x_TD: Tensor, params: dict[str, Tensor], spec: TopPRouter, ctx: RouteContext) -> RoutingResult:
    """Dynamic top-p routing in the dense form (see the module docstring)."""
    _, logits_TE = linear_logits(x_TD, params, spec, ctx)
    probs_TE = logits_TE.softmax(-1)
    selected_TE = top_p_mask(probs_TE, spec.threshold, spec.max_k)
    gates_TE = torch.where(selected_TE, probs_TE, torch.zeros_like(probs_TE))
    if spec.renormalize:
        gates_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
    extra = spec.entropy_weight * mean_entropy(logits_TE) if spec.entropy_weight > 0 else None
    nominal_k = max(1, round(spec.expected_k or spec.max_k or ctx.n_experts))
    return dense_routing(logits_TE, probs_TE, gates_TE, selected_TE, nominal_k=nominal_k, extra_loss=extra)
