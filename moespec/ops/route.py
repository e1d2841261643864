"""``moespec::topk_route``: token-choice top-k selection and combine weights, one fused op.

Legend: T tokens, E experts, K top-k.

Input are the (already jittered, temperature-scaled, noised) router logits; the op computes
    probs = softmax(logits) | sigmoid(logits)
    crit  = probs (softmax_then_topk, sigmoid) | logits (topk_then_softmax), + expert_bias,
            restricted to the kept groups (group-limited selection, -inf elsewhere)
    idx   = top-k of crit (ties to the lower index), or for GShard `sampling` the best plus
            argmax(logits + gumbel) among the other kept experts
    weight = scale * (probs[idx], renormalised if asked | softmax(logits[idx]))
exactly as the reference router does (moespec.reference.routers.topk); both take stable top-k
and the group masks from moespec.common.select. Gradients flow from ``weight`` and ``probs``
to ``logits`` through an analytic backward; ``idx`` has none. Randomness (Gumbel noise) is an
input, so the op is pure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common import select as selection
from moespec.common.select import stable_topk


def _topk_idx(crit_TE: Tensor, k: int) -> Tensor:
    """``stable_topk`` (ties to the lower index): on the CPU from ``torch.topk`` of k+1
    (one pass, no full sort of every row), exact when those k+1 values are distinct and not
    NaN (``torch.topk`` leaves tie order unspecified); otherwise, and off the CPU (the check
    would be a host sync), the stable sort."""
    e = crit_TE.shape[-1]
    if crit_TE.device.type == "cpu" and crit_TE.dim() == 2 and 0 < k < e and crit_TE.shape[0] > 0:
        v_TK1, i_TK1 = torch.topk(crit_TE, k + 1, dim=-1, sorted=True)
        if not bool((v_TK1[:, :-1] == v_TK1[:, 1:]).any() | v_TK1.isnan().any()):
            return i_TK1[:, :k]
    return stable_topk(crit_TE, k)


def _scores(logits_TE: Tensor, score: str) -> Tensor:
    return logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()


@torch.library.custom_op("moespec::topk_route", mutates_args=())
def topk_route(
    logits_TE: Tensor,
    expert_bias_E: Tensor,
    gumbel_TE: Tensor,
    k: int,
    score: str,
    order: str,
    renormalize: bool,
    scale: float,
    n_groups: int,
    topk_groups: int,
    group_score: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(weight_TK, idx_TK, probs_TE)``; ``n_groups=0`` means no group limit, an
    empty ``expert_bias_E`` no bias, an empty ``gumbel_TE`` no second-expert sampling."""
    probs_TE = _scores(logits_TE, score)
    crit_TE = logits_TE if order == "topk_then_softmax" else probs_TE
    if expert_bias_E.numel() > 0:
        crit_TE = crit_TE + expert_bias_E.to(crit_TE.dtype)
    selectable_TE = torch.ones_like(crit_TE, dtype=torch.bool)
    if n_groups > 0:
        selectable_TE = selection.group_limited_mask(crit_TE, n_groups, topk_groups, group_score)  # type: ignore[arg-type]
        crit_TE = selection.mask_unselected(crit_TE, selectable_TE)
    if gumbel_TE.numel() > 0:
        first_T = stable_topk(crit_TE, 1)[:, 0]
        allowed_TE = selectable_TE.clone()
        allowed_TE[torch.arange(crit_TE.shape[0], device=crit_TE.device), first_T] = False
        noisy_TE = selection.mask_unselected(logits_TE + gumbel_TE.to(logits_TE.dtype), allowed_TE)
        idx_TK = torch.stack([first_T, stable_topk(noisy_TE, 1)[:, 0]], dim=1)
    else:
        idx_TK = _topk_idx(crit_TE, k)
    if order == "topk_then_softmax":
        weight_TK = logits_TE.gather(1, idx_TK).softmax(-1)
    else:
        weight_TK = probs_TE.gather(1, idx_TK)
        if renormalize:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
    # contiguous: the fake promises dense [T, K] outputs (top-k slices are strided views).
    return (weight_TK * scale).contiguous(), idx_TK.contiguous(), probs_TE


@topk_route.register_fake
def _(logits_TE, expert_bias_E, gumbel_TE, k, score, order, renormalize, scale, n_groups, topk_groups,
      group_score):  # fmt: skip
    t = logits_TE.shape[0]
    idx_TK = logits_TE.new_empty(t, k, dtype=torch.int64)
    return logits_TE.new_empty(t, k), idx_TK, torch.empty_like(logits_TE)


def _setup(ctx, inputs, output) -> None:
    logits = inputs[0]
    score, order, renormalize, scale = inputs[4:8]
    weight, idx, probs = output
    ctx.save_for_backward(logits, idx, probs, weight)
    ctx.cfg = (score, order, renormalize, scale)
    # An unused output's gradient arrives as None, not as a dense zero tensor (the probs
    # usually get none: only a load-balance loss reads them).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_weight_TK, _grad_idx, grad_probs_TE):
    logits_TE, idx_TK, probs_TE, weight_TK = ctx.saved_tensors
    score, order, renormalize, scale = ctx.cfg
    # Unused outputs' gradients are None. The weights' gradient is sparse (K of E per token):
    # it is scattered into a fresh [T, E] in place, or added to the probs' own gradient.
    g_z_TE, g_p_TE = None, grad_probs_TE  # the gradient reaching the logits directly / the probs
    if grad_weight_TK is not None:
        g_w_TK = grad_weight_TK * scale
        if order == "topk_then_softmax":
            w0_TK = weight_TK / scale  # softmax over the selected logits
            g_sel_TK = w0_TK * (g_w_TK - (g_w_TK * w0_TK).sum(-1, keepdim=True))
            g_z_TE = torch.zeros_like(logits_TE).scatter_add_(1, idx_TK, g_sel_TK)
        else:
            if renormalize:
                sel_TK = probs_TE.gather(1, idx_TK)
                w0_TK = weight_TK / scale
                g_w_TK = (g_w_TK - (g_w_TK * w0_TK).sum(-1, keepdim=True)) / sel_TK.sum(-1, keepdim=True)
            if g_p_TE is None:
                g_p_TE = torch.zeros_like(probs_TE).scatter_add_(1, idx_TK, g_w_TK)
            else:
                g_p_TE = g_p_TE.scatter_add(1, idx_TK, g_w_TK)
    if g_p_TE is not None:
        if score == "softmax":
            g_s_TE = probs_TE * (g_p_TE - (g_p_TE * probs_TE).sum(-1, keepdim=True))
        else:
            g_s_TE = g_p_TE * probs_TE * (1.0 - probs_TE)
        g_z_TE = g_s_TE if g_z_TE is None else g_z_TE + g_s_TE
    return g_z_TE, None, None, None, None, None, None, None, None, None, None


topk_route.register_autograd(_backward, setup_context=_setup)


def _triton_topk_route(logits_TE: Tensor, expert_bias_E: Tensor, gumbel_TE: Tensor, *config) -> tuple:
    """:func:`topk_route` computed by the fused Triton router kernel (``target.backend:
    triton``); second-expert sampling (a non-empty ``gumbel_TE``) is not part of it: the
    lowering keeps :func:`topk_route` for GShard's sampling router."""
    if gumbel_TE.numel() > 0:
        raise ValueError("triton_topk_route has no second-expert sampling; use moespec::topk_route")
    from moespec.ops import _route_triton

    return _route_triton.forward(logits_TE, expert_bias_E, *config)


# The same schema as topk_route (taken from it, not written twice), fake and autograd.
_SCHEMA = str(topk_route._opoverload._schema)
triton_topk_route = torch.library.custom_op(
    "moespec::triton_topk_route", _triton_topk_route, mutates_args=(), schema=_SCHEMA[_SCHEMA.index("(") :]
)
triton_topk_route.register_fake(_)
triton_topk_route.register_autograd(_backward, setup_context=_setup)
