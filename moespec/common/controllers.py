"""Running controllers: router state updated after a training forward, not by gradient.

Both the module (after each training forward) and the reference's callers apply these, so
the update rules live once. The state they update is kept in fp32 whatever the layer's dtype
(a controller's small steps vanish in bf16).

Shape legend: E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def update_expert_bias(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing update (DeepSeek-V3): b_e += rate * sign(mean load - load_e).

    Returns the new bias (no in-place update, no gradient). Under-loaded experts go up,
    over-loaded ones down, balanced ones stay. Not mean-centred (torchtitan centres it).
    """
    load_E = tokens_per_expert_E.to(torch.float64)
    return (bias_E + rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)).detach()


def update_l1_coeff(
    l1_coeff: Tensor, routed_per_expert_E: Tensor, n_tokens: int, k: int, multiplier: float
) -> Tensor:
    """ReMoE's controller: s = 1 − Σ_e n_e / (T E) (sparsity of R), s* = 1 − k / E;
    λ ← λ·α if s < s* (too dense) else λ/α. Returns the new λ (no in-place update, no
    gradient); unchanged when T = 0."""
    if n_tokens == 0:
        return l1_coeff.detach().clone()
    n_experts = routed_per_expert_E.shape[0]
    density = routed_per_expert_E.to(torch.float64).sum() / (n_tokens * n_experts)
    sparsity, target = 1.0 - density, 1.0 - k / n_experts
    lam = l1_coeff.detach().to(torch.float64)
    new = torch.where(sparsity < target, lam * multiplier, lam / multiplier)
    return new.to(l1_coeff.dtype)
