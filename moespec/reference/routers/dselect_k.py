"""`kind: dselect_k`: DSelect-k (Hazimeh et al. 2021, arXiv:2106.03760), the reference,
written as the paper's per-bit product (google-research ``dselect_k_moe.py``,
example-conditioned gate, applied per token).

    z_t      = W_z x_t + b_z  reshaped [k, m]           (router.z_weight [k·m, D], z_bias [k·m])
    S(t)     = 0 (t <= -γ/2), 1 (t >= γ/2), -2t³/γ³ + 3t/(2γ) + 1/2 otherwise
    r_tl(i)  = Π_j (bit_j(i) ? S(z_tlj) : 1 - S(z_tlj))  bits most significant first (binary_repr)
    α_t      = softmax(W_a x_t + b_a) over the k selectors (router.alpha_weight [k, D], alpha_bias [k])
    w_ti     = Σ_l α_tl r_tl(i)
    selected = w > 0   (every expert until S saturates; at most k afterwards)

Training-only regularisers (the code adds them when ``training``), averaged over tokens
where the code sums over the batch:
    entropy_weight · Σ_l Σ_i -r_tl(i) log(r_tl(i) + 1e-6)
    reachability_weight · Σ_l 1 / max(Σ_i r_tl(i), 1e-6)   (only when E is not a power of 2)

Shape legend: T tokens, D d_model, E experts, L = k selectors, M = m bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult, dense_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, router_dtype
from moespec.spec.routers.dselect_k import DSelectKRouter, n_binary

ENTROPY_EPS = 1e-6  # the code's EPSILON inside the log


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """S(t): 0 below -γ/2, 1 above γ/2, the cubic -2t³/γ³ + 3t/(2γ) + 1/2 between (C¹)."""
    cubic = -2.0 * t**3 / gamma**3 + 3.0 * t / (2.0 * gamma) + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


def selector_outputs(s_TLM: Tensor, n_experts: int) -> Tensor:
    """r [T, L, E]: each selector's weight on each expert, one factor per bit."""
    m = s_TLM.shape[-1]
    r_TLE = s_TLM.new_ones(*s_TLM.shape[:2], n_experts)
    for j in range(m):
        # Bit j of the code, most significant first (np.binary_repr(i, width=m)[j]).
        bit_E = (torch.arange(n_experts, device=s_TLM.device) >> (m - 1 - j)) & 1
        s_TL1 = s_TLM[:, :, j : j + 1]
        r_TLE = r_TLE * torch.where(bit_E.bool(), s_TL1, 1.0 - s_TL1)
    return r_TLE


@REFERENCE_ROUTERS.register("dselect_k")
def dselect_k_route(
    x_TD: Tensor, params: dict[str, Tensor], spec: DSelectKRouter, ctx: RouteContext
) -> RoutingResult:
    """DSelect-k expert weights in the dense form (see the module docstring)."""
    dtype = router_dtype(spec, ctx)
    n, k = ctx.n_experts, spec.k
    m = n_binary(n)
    x_TD = x_TD.to(dtype)
    z_TLM = (x_TD @ params["router.z_weight"].to(dtype).T + params["router.z_bias"].to(dtype)).reshape(
        -1, k, m
    )
    r_TLE = selector_outputs(smooth_step(z_TLM, spec.gamma), n)
    a_TL = (x_TD @ params["router.alpha_weight"].to(dtype).T + params["router.alpha_bias"].to(dtype)).softmax(
        -1
    )
    w_TE = (a_TL[:, :, None] * r_TLE).sum(1)

    extra = None
    if ctx.training and x_TD.shape[0] > 0:
        terms = []
        if spec.entropy_weight > 0:
            ent_T = -(r_TLE * torch.log(r_TLE + ENTROPY_EPS)).sum((1, 2))
            terms.append(spec.entropy_weight * ent_T.mean())
        if n != 2**m and spec.reachability_weight > 0:
            # 1 / max(sum, 1e-6): a selector saturated on unreachable codes has sum 0, where
            # the code's 1/sum is inf with NaN gradients (S is flat there: no gradient anyway).
            reach_TL = 1.0 / r_TLE.sum(-1).clamp(min=ENTROPY_EPS)
            terms.append(spec.reachability_weight * reach_TL.sum(-1).mean())
        extra = sum(terms[1:], terms[0]) if terms else None
    return dense_routing(w_TE, w_TE, w_TE, w_TE > 0, nominal_k=k, extra_loss=extra)
