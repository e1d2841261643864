"""Reference auxiliary losses: Switch and GShard load balancing, Shazeer's importance/load
CV², the ST-MoE router z-loss, and their weighted sum (the layer's ``aux_loss``).

Normalisations (each gives 1 at perfectly uniform routing for the two LBLs):
- switch: E * sum_e f_e P_e, f_e = (1/(T k)) sum_t 1[e in S_t] (fraction of the T*k routed
  slots that went to e; for k=1 the Switch paper's fraction of tokens), P_e = mean_t p_te.
  HF's load_balancing_loss_func divides by T only, so it equals k times this; DeepSeekMoE's
  f'_i = N_r/(K_r T) * count_i gives exactly this. S_t is the router's actual selection
  (expert bias and group limits included, capacity drops not); Megatron instead re-runs a
  plain top-k on the unbiased scores for the loss. ``count: unbiased_topk`` takes that
  reading, DeepSeek-V3's eq. 17-20 as written: f_i = N_r/(K_r T) sum_t 1[s_it in
  TopK({s_jt | 1 <= j <= N_r}, K_r)], the top-k of the unbiased scores over all N_r routed
  experts (the bias b_i and the group limit belong to the gating value g'_it of eq. 16, not
  to eq. 18's TopK, which ranges over every expert; ties to the lower index).
- gshard: E^2 * mean_e(me_e * ce_e), me_e = mean_t p_te, ce_e = fraction of tokens whose
  top-1 choice is e (fairscale/torchscale top2gating, vmoe).
- For sigmoid scores p_t is renormalised to sum to 1 over the experts before P / me
  (DeepSeek-V3's s'); softmax scores already do.
- importance_load_cv2 (Shazeer 2017): Importance_e = sum_t G_te (combine weights);
  Load_e = sum_t Phi((z_te - thr_te) / sigma_te) with noise, the hard count otherwise (t2t);
  CV(x)^2 = Var(x) / (mean(x)^2 + 1e-10) with the population (biased) variance, as t2t's
  ``cv_squared`` (davidmrau uses the unbiased one).
- z-loss (ST-MoE): mean_t logsumexp(z_t)^2 on the clean logits, over the batch (never per
  sequence; `global` gathers the batch over ranks before this module runs).
- parameter_penalty (HMoE): the Switch loss with f_e scaled by |θ_e| / mean |θ| (parameters
  per expert; zero-compute experts count 0, constant ones 3·D), reconstructed from the paper.

Shape legend: T tokens, E experts, K top-k, B sequences.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult
from moespec.ir.numbers import expert_sizes
from moespec.spec.schema import LayerSpec
from moespec.spec.sparsity import LossesSpec


def score_distribution(probs_TE: Tensor, score: str) -> Tensor:
    """Per-token distribution over experts: softmax scores as they are, sigmoid scores
    divided by their sum (DeepSeek-V3's s' for the balance loss)."""
    return probs_TE if score == "softmax" else probs_TE / probs_TE.sum(-1, keepdim=True)


def unbiased_topk_TE(probs_TE: Tensor, k: int | Tensor) -> Tensor:
    """Bool [T, E]: the k best unbiased scores of each token over all experts (no expert
    bias, no group limit; ties to the lower index), DeepSeek-V3's TopK of eq. 18. ``k``
    may be a 0-dim tensor (a scheduled k): ranks below it are kept."""
    t_count, e_count = probs_TE.shape
    order_TE = torch.sort(probs_TE.detach(), dim=-1, descending=True, stable=True).indices
    keep_E = torch.arange(e_count, device=probs_TE.device) < k
    out_TE = torch.zeros(t_count, e_count, dtype=torch.bool, device=probs_TE.device)
    return out_TE.scatter(1, order_TE, keep_E.expand(t_count, e_count))


def switch_loss(p_TE: Tensor, selected_TE: Tensor, k: int) -> Tensor:
    """E * sum_e f_e P_e with f_e = count_e / (T k) and P_e = mean_t p_te."""
    t_count, e_count = p_TE.shape
    f_E = selected_TE.to(p_TE.dtype).sum(0) / (t_count * k)
    return e_count * torch.sum(f_E * p_TE.mean(0))


def parameter_penalty_loss(p_TE: Tensor, selected_TE: Tensor, k: int, size_E: Tensor) -> Tensor:
    """HMoE P-Penalty: E * sum_e f_e (|θ_e| / mean |θ|) P_e (f_e, P_e as in the Switch loss).
    The formula is reconstructed from the paper's description (f̂_e = f_e scaled by the
    expert's relative size); no released code was available to check it against."""
    t_count, e_count = p_TE.shape
    f_E = selected_TE.to(p_TE.dtype).sum(0) / (t_count * k)
    size_E = size_E.to(p_TE.device, p_TE.dtype)  # a host-side constant of the spec
    rel_E = size_E / size_E.mean()
    return e_count * torch.sum(f_E * rel_E * p_TE.mean(0))


def relative_sizes_E(layer: LayerSpec, d_model: int) -> Tensor:
    """Parameters of each routed expert (FFN groups in order, then zero-compute experts),
    fp64 [E], for the parameter penalty (the IR's ``ExpertsNode.sizes``)."""
    return torch.tensor(expert_sizes(layer, d_model), dtype=torch.float64)


def gshard_loss(p_TE: Tensor, top1_T: Tensor) -> Tensor:
    """E^2 * mean_e(me_e * ce_e) with ce from the top-1 choice only."""
    e_count = p_TE.shape[1]
    # Counted in int64 with scatter_add, not bincount (which reads its largest index back to
    # the host on CUDA), and not in the router dtype (bf16 counts stop at 256).
    counts_E = torch.zeros(e_count, dtype=torch.int64, device=top1_T.device)
    ce_E = counts_E.scatter_add_(0, top1_T, torch.ones_like(top1_T)).to(p_TE.dtype) / p_TE.shape[0]
    return e_count**2 * torch.mean(p_TE.mean(0) * ce_E)


def cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance (t2t ``cv_squared``)."""
    mean = x_E.mean()
    return ((x_E - mean) ** 2).mean() / (mean**2 + 1e-10)


def normal_cdf(z: Tensor) -> Tensor:
    """Phi(z) = 0.5 (1 + erf(z / sqrt 2))."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def smooth_load(clean_TE: Tensor, noisy_TE: Tensor, std_TE: Tensor, k: int) -> Tensor:
    """Shazeer 2017 smooth load: Load_e = sum_t P(e stays in token t's top-k when only its
    own noise is redrawn) = sum_t Phi((z_te - thr_te) / sigma_te), thr_te = the k-th largest
    noisy logit among the other experts: the (k+1)-th overall if e is in the top-k, the k-th
    otherwise (t2t ``_prob_in_top_k``; the gradient also flows through the threshold)."""
    t_count, e_count = noisy_TE.shape
    if k >= e_count:
        return clean_TE.new_full((e_count,), float(t_count))  # every expert always in the top-k
    top_TK1 = torch.sort(noisy_TE, dim=-1, descending=True, stable=True).values[:, : k + 1]
    thr_in_T1, thr_out_T1 = top_TK1[:, k : k + 1], top_TK1[:, k - 1 : k]
    is_in_TE = noisy_TE > thr_in_T1
    prob_TE = torch.where(
        is_in_TE, normal_cdf((clean_TE - thr_in_T1) / std_TE), normal_cdf((clean_TE - thr_out_T1) / std_TE)
    )
    return prob_TE.sum(0)


def importance_load_loss(routing: RoutingResult, w_importance: float, w_load: float) -> Tensor:
    """w_imp * CV(Importance)^2 + w_load * CV(Load)^2 over the rows of ``routing``."""
    importance_E = routing.gates_TE().sum(0)
    if routing.noise_std_TE is not None:
        load_E = smooth_load(routing.logits_TE, routing.noisy_logits_TE, routing.noise_std_TE, routing.k)
    else:
        load_E = routing.tokens_per_expert().to(routing.probs_TE.dtype)
    return w_importance * cv_squared(importance_E) + w_load * cv_squared(load_E)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def rows(routing: RoutingResult, lo: int, hi: int) -> RoutingResult:
    """The routing of tokens lo..hi-1 only (for per-sequence losses)."""
    cut = {
        f.name: getattr(routing, f.name)[lo:hi]
        for f in dataclasses.fields(routing)
        if isinstance(getattr(routing, f.name), Tensor) and getattr(routing, f.name).dim() > 0
    }
    return dataclasses.replace(routing, **cut)


def balance_loss(
    routing: RoutingResult, losses: LossesSpec, score: str, size_E: Tensor | None = None
) -> Tensor:
    """The unweighted (for importance_load_cv2: internally weighted) balance loss on one
    scope of rows."""
    lb = losses.load_balance
    assert lb is not None
    p_TE = score_distribution(routing.probs_TE, score)
    if lb.kind == "switch":
        if lb.count == "unbiased_topk":
            return switch_loss(p_TE, unbiased_topk_TE(routing.probs_TE, routing.k), routing.k)
        return switch_loss(p_TE, routing.selected_TE(), routing.k)
    if lb.kind == "gshard":
        return gshard_loss(p_TE, routing.topk_idx_TK[:, 0])
    if lb.kind == "parameter_penalty":
        assert size_E is not None, "the parameter penalty needs the experts' sizes"
        return parameter_penalty_loss(p_TE, routing.selected_TE(), routing.k, size_E)
    return importance_load_loss(routing, lb.importance_weight, lb.load_weight)


def aux_losses(
    routing: RoutingResult,
    losses: LossesSpec,
    *,
    score: str,
    seq_len: int | None = None,
    size_E: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(aux_loss, parts)``: the weighted sum of the configured losses and each unweighted
    part (``load_balance``, ``z_loss``). ``scope: sequence`` splits the T rows into
    consecutive sequences of ``seq_len`` (default: all T rows are one sequence), computes
    the loss per sequence and averages; ``batch`` uses all rows at once. No tokens: zero
    loss and no parts. ``size_E`` (:func:`relative_sizes_E`) feeds the parameter penalty."""
    parts: dict[str, Tensor] = {}
    total = routing.logits_TE.new_zeros(())
    t_count = routing.logits_TE.shape[0]
    if t_count == 0:
        return total, parts  # no tokens, no loss (the means would be 0/0)
    lb = losses.load_balance
    if lb is not None:
        if lb.scope == "sequence" and seq_len is not None:
            assert t_count % seq_len == 0, "T must be a whole number of sequences"
            per_seq = [
                balance_loss(rows(routing, s, s + seq_len), losses, score, size_E)
                for s in range(0, t_count, seq_len)
            ]
            part = torch.stack(per_seq).mean()
        else:
            part = balance_loss(routing, losses, score, size_E)
        parts["load_balance"] = part
        # importance_load_cv2 carries its two weights inside; the others have one weight.
        total = total + (part if lb.kind == "importance_load_cv2" else lb.weight * part)
    if losses.z_loss is not None:
        parts["z_loss"] = z_loss(routing.logits_TE)
        total = total + losses.z_loss.weight * parts["z_loss"]
    if routing.extra_loss is not None:
        parts["router"] = routing.extra_loss
        total = total + routing.extra_loss
    return total, parts
