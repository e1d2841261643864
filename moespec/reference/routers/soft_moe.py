"""`kind: soft_moe`: Soft MoE slot logits, dispatch and combine weights.

Puigcerver et al. 2023 (arXiv:2308.00951), Algorithm 1 and Section 2.3, and vmoe's
``SoftRouter`` (google-research/vmoe ``vmoe/projects/soft_moe/router.py``). For one group of
T tokens X [T, D] and slot parameters Φ [S, D], S = E·p (row s = e·p + j: slot j of expert e):

    normalize:  X̂ = l2norm(X) per token,  Φ̂ = scale · l2norm(Φ) per slot,  L = X̂ Φ̂ᵀ
    plain:      L = X Φᵀ
    D = softmax(L) over the T tokens of the group (per slot: dispatch weights)
    C = softmax(L) over all S slots (per token: combine weights)

l2norm(v) = v · rsqrt(Σ v² + 1e-6), vmoe's ``normalize`` (the eps sits inside the sqrt). vmoe
multiplies ``scale`` into whichever of X̂ / Φ̂ has fewer entries; the product is the same, we
always scale Φ̂. Not implemented from vmoe: the optional logit noise (``noise_std``, default 0)
and the bf16 dispatcher (the router dtype is the spec's). Groups: a 3-D input [B, S, D] is B
groups of ``ctx.seq_len`` tokens (the paper's per-image groups), anything else one group.

Shape legend: T tokens, D d_model, S slots (E·p), G groups, L tokens per group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, SoftRouting, router_dtype
from moespec.spec.routers.soft_moe import SoftMoERouter

EPS = 1e-6


def l2_normalize(v: Tensor) -> Tensor:
    """v / sqrt(sum v² + 1e-6) along the last dim (vmoe ``normalize``)."""
    return v * torch.rsqrt(v.square().sum(-1, keepdim=True) + EPS)


def soft_logits(x_TD: Tensor, phi_SD: Tensor, scale: Tensor | None) -> Tensor:
    """L [T, S] = X̂ (scale · Φ̂)ᵀ with ``scale`` (normalised variant), else X Φᵀ."""
    if scale is None:
        return x_TD @ phi_SD.T
    return l2_normalize(x_TD) @ (scale * l2_normalize(phi_SD)).T


def group_softmax(logits_TS: Tensor, seq_len: int | None) -> Tensor:
    """Dispatch weights: softmax over the tokens of each group (column sums are 1 per group)."""
    t, s = logits_TS.shape
    group = seq_len if seq_len else max(t, 1)
    return logits_TS.reshape(-1, group, s).softmax(1).reshape(t, s)


@REFERENCE_ROUTERS.register("soft_moe")
def soft_moe(x_TD: Tensor, params: dict[str, Tensor], spec: SoftMoERouter, ctx: RouteContext) -> SoftRouting:
    """Soft MoE routing in the router dtype (see the module docstring)."""
    dtype = router_dtype(spec, ctx)
    phi_SD = params["router.weight"].to(dtype)
    scale = params["router.scale"].to(dtype) if spec.normalize else None
    logits_TS = soft_logits(x_TD.to(dtype), phi_SD, scale)
    return SoftRouting(
        logits_TS=logits_TS,
        dispatch_TS=group_softmax(logits_TS, ctx.seq_len),
        combine_TS=logits_TS.softmax(-1),
        slots_per_expert=spec.slots_per_expert,
        n_experts=ctx.n_experts,
    )
