"""The graph's loss-and-statistics node: auxiliary losses plus routing stats, no host sync.

Legend: T tokens, E experts, K top-k.

Losses are the reference formulas (moespec.common.losses) applied to the fused
router's outputs: they are plain differentiable torch code and small next to the experts.
Statistics are tensors (never Python floats), so reading them does not sync a device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moespec.common.losses import aux_losses, score_distribution
from moespec.common.routing import RoutingResult
from moespec.ir.nodes import LossesNode


class AuxLossAndStats(nn.Module):
    """Computes ``(aux_loss, routed_per_expert_E, tokens_per_expert_E, dropped_fraction,
    router_entropy, load_ratio)`` for one layer call."""

    def __init__(
        self,
        losses: LossesNode,
        score: str,
        n_experts: int,
        nominal_k: int | None = None,
        expert_sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.losses, self.score, self.n_experts, self.nominal_k = losses, score, n_experts, nominal_k
        # Parameters per expert (the parameter penalty's weights): derived from the spec, so
        # neither checkpoint state nor a buffer; a tensor is made per call only when used.
        lb = losses.load_balance
        use = lb is not None and lb.kind == "parameter_penalty"
        self.expert_sizes = tuple(float(s) for s in expert_sizes) if use else None

    def extra_repr(self) -> str:
        lb, z = self.losses.load_balance, self.losses.z_loss
        return f"load_balance={lb.kind if lb else None}, z_loss={z.weight if z else None}"

    def forward(
        self,
        clean_TE: Tensor,
        noisy_TE: Tensor,
        std_TE: Tensor,
        probs_TE: Tensor,
        idx_TK: Tensor,
        weight_TK: Tensor,
        active_TK: Tensor,
        keep_TK: Tensor,
        extra_loss: Tensor,
        seq_len: int,
        k_active: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        routing = RoutingResult(
            logits_TE=clean_TE,
            noisy_logits_TE=noisy_TE,
            # The smooth load estimator needs the noise std; in eval there is no noise.
            noise_std_TE=std_TE if self.training and std_TE.numel() > 0 else None,
            probs_TE=probs_TE,
            topk_idx_TK=idx_TK,
            topk_weight_TK=weight_TK,
            active_TK=active_TK,
            n_experts=self.n_experts,
            # A scheduled k (0-dim tensor) overrides the compiled one for the balance losses.
            nominal_k=k_active if k_active is not None else self.nominal_k,
            # A router-specific loss (0-element when the router has none).
            extra_loss=extra_loss if extra_loss.numel() > 0 else None,
        )
        aux, _ = aux_losses(
            routing,
            self.losses,
            score=self.score,
            seq_len=seq_len if seq_len > 0 else None,
            size_E=None if self.expert_sizes is None else probs_TE.new_tensor(self.expert_sizes),
        )
        routed_E = _counts(idx_TK, active_TK, self.n_experts)
        kept_E = _counts(idx_TK, keep_TK, self.n_experts)
        n_active = routed_E.sum()
        dropped = (n_active - kept_E.sum()).to(probs_TE.dtype) / n_active.clamp(min=1).to(probs_TE.dtype)
        p = score_distribution(probs_TE.detach(), self.score)
        # 0 log 0 = 0 (xlogy); NaN scores count 0 too, as in the reference statistics.
        plogp = torch.special.xlogy(p, p).nan_to_num_(0.0, posinf=math.inf, neginf=-math.inf)
        entropy = -plogp.sum(-1).mean() if p.shape[0] else p.new_zeros(())
        ratio = routed_E.max().to(p.dtype) / routed_E.min().to(p.dtype)
        return aux, routed_E, kept_E, dropped, entropy, ratio


def _counts(idx_TK: Tensor, mask_TK: Tensor, n_experts: int) -> Tensor:
    out = torch.zeros(n_experts, dtype=torch.int64, device=idx_TK.device)
    return out.scatter_add(0, idx_TK.reshape(-1), mask_TK.reshape(-1).to(torch.int64))
