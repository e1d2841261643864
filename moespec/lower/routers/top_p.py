"""Lowering of `kind: top_p` (dynamic top-p), dense form:

logits_TE = linear(x, router.weight);  probs_TE = softmax(logits_TE)   (router dtype)
selected_TE = top_p_selected(probs_TE, threshold, max_k)              (no gradient)
gates_TE  = probs_TE · selected_TE  (/ Σ if renormalize)
extra     = entropy_weight · mean_t(−Σ p log p)                      (if entropy_weight > 0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, DenseReplay, RouteNodes, dense_slots, linear_logits


def top_p_selected(probs_TE: Tensor, threshold: float, max_k: int) -> Tensor:
    """Bool [T, E]: per row, experts in decreasing-probability order (stable) up to and
    including the first whose cumulative sum reaches ``threshold`` (all of them if none
    does), at most ``max_k`` (0: no cap). The released code's formulation (``cumsum > τ``,
    first crossing index, one-hot), with ≥ for the paper's "reaches"."""
    t_count, n_experts = probs_TE.shape
    sorted_TE, order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True)
    reached_TE = torch.cumsum(sorted_TE, dim=-1) >= threshold
    # Position of the crossing expert; a row that never reaches τ keeps everything.
    any_T = reached_TE.any(-1)
    cross_T = torch.where(any_T, reached_TE.to(torch.int8).argmax(-1), n_experts - 1)
    if max_k > 0:
        cross_T = cross_T.clamp(max=max_k - 1)
    pos_TE = torch.arange(n_experts, device=probs_TE.device).expand(t_count, n_experts)
    keep_sorted_TE = pos_TE <= cross_T[:, None]
    return torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)


def masked_gates(probs_TE: Tensor, selected_TE: Tensor, renormalize: bool) -> Tensor:
    """probs where selected, 0 elsewhere; divided by the row's kept sum if ``renormalize``."""
    gates_TE = probs_TE * selected_TE.to(probs_TE.dtype)
    return gates_TE / gates_TE.sum(-1, keepdim=True) if renormalize else gates_TE


def weighted_entropy(logits_TE: Tensor, weight: float) -> Tensor:
    """weight · mean_t(−Σ_e p log p), p = softmax(logits), via log_softmax (no 0·log 0)."""
    logp_TE = F.log_softmax(logits_TE, dim=-1)
    h_T = -(logp_TE.exp() * logp_TE).sum(-1)
    return weight * h_T.sum() / max(h_T.shape[0], 1)


@LOWERINGS.register("top_p")
class TopPLowering(DenseReplay):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        _, logits = linear_logits(b, layer, x_TD, inputs)
        probs = b.fn(torch.softmax, logits, -1, origin=at)
        selected = b.fn(top_p_selected, probs, r.threshold, r.max_k or 0, origin=at)
        # Routing replay: the recorded experts, weighted (and renormalised) as the router would.
        selected = b.fn(helpers.replayed_selection, selected, inputs["replay_idx_TK"], origin=at)
        gates = b.fn(masked_gates, probs, selected, r.renormalize, origin=at)
        gates = b.fn(helpers.replayed_weight, gates, inputs["replay_w_TK"], origin=at)
        idx = b.fn(dense_slots, selected, origin=at)
        extra = b.fn(weighted_entropy, logits, r.entropy_weight, origin=at) if r.entropy_weight > 0 else None
        return RouteNodes(logits, probs, gates, idx, selected, dense=True, extra_loss=extra)
