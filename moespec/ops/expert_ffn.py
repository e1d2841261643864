"""``moespec::expert_ffn``: gather rows by token, run each expert's FFN, one fused op.

Legend: T tokens, D d_model, F expert width, E experts in this group, N routed rows (sorted by
expert, ``offsets_E1`` global over all experts of the layer).

For the experts ``first .. first+E-1`` of one group, row n in [offsets[first],
offsets[first+E]) belongs to expert e and computes
    mlp: up = x[token_idx[n]] W_up[e]^T + b_up[e];   y = act(up) W_down[e]^T + b_down[e]
    glu: also gate = x W_gate[e]^T + b_gate[e];      y = (act(gate) * up) W_down[e]^T + b_down[e]
Rows outside the group are zero. The op returns ``(y_ND, up_NF, gate_NF)``; the pre-activations
are saved for backward instead of recomputing two of the three GEMMs. Absent optional tensors
are passed as empty tensors (custom ops have no Optional outputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.ops.activations import act, act_grad
from moespec.ops.gemm import gmm, gmm_wgrad


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _present(t: Tensor | None) -> bool:
    return t is not None and t.numel() > 0


def _group_rows(offsets_E1: Tensor, first: int, n_experts: int) -> tuple[int, int, Tensor]:
    lo, hi = offsets_E1[first].item(), offsets_E1[first + n_experts].item()
    return int(lo), int(hi), offsets_E1[first : first + n_experts + 1] - lo


def _per_row(b_EX: Tensor, local_E1: Tensor) -> Tensor:
    counts_E = local_E1[1:] - local_E1[:-1]
    return b_EX.repeat_interleave(counts_E, dim=0, output_size=int(local_E1[-1].item()))


@torch.library.custom_op("moespec::expert_ffn", mutates_args=())
def expert_ffn(
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    b_up_EF: Tensor,
    b_gate_EF: Tensor,
    b_down_ED: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped expert FFN over expert-sorted rows (see the module docstring)."""
    n_rows, n_exp, f = token_idx_N.shape[0], w_up_EFD.shape[0], w_up_EFD.shape[1]
    glu = _present(w_gate_EFD)
    y_ND = x_TD.new_zeros(n_rows, x_TD.shape[1])
    up_NF = x_TD.new_zeros(n_rows, f)
    gate_NF = x_TD.new_zeros(n_rows, f) if glu else _empty(x_TD)
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    if hi == lo:
        return y_ND, up_NF, gate_NF
    x_RD = x_TD.index_select(0, token_idx_N[lo:hi])
    up_RF = gmm(x_RD, w_up_EFD, local_E1)
    if _present(b_up_EF):
        up_RF = up_RF + _per_row(b_up_EF, local_E1)
    if glu:
        gate_RF = gmm(x_RD, w_gate_EFD, local_E1)
        if _present(b_gate_EF):
            gate_RF = gate_RF + _per_row(b_gate_EF, local_E1)
        h_RF = act(activation, gate_RF) * up_RF
        gate_NF[lo:hi] = gate_RF
    else:
        h_RF = act(activation, up_RF)
    y_RD = gmm(h_RF, w_down_EDF, local_E1)
    if _present(b_down_ED):
        y_RD = y_RD + _per_row(b_down_ED, local_E1)
    y_ND[lo:hi] = y_RD
    up_NF[lo:hi] = up_RF
    return y_ND, up_NF, gate_NF


@expert_ffn.register_fake
def _(x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF,
      b_down_ED, activation):  # fmt: skip
    n_rows, f = token_idx_N.shape[0], w_up_EFD.shape[1]
    gate = x_TD.new_empty(n_rows, f) if w_gate_EFD.numel() > 0 else x_TD.new_empty(0)
    return x_TD.new_empty(n_rows, x_TD.shape[1]), x_TD.new_empty(n_rows, f), gate


@torch.library.custom_op("moespec::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(
    grad_y_ND: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    up_NF: Tensor,
    gate_NF: Tensor,
    has_bias: bool,
    activation: str,
) -> list[Tensor]:
    """Gradients of :func:`expert_ffn`: [x, w_up, w_gate, w_down, b_up, b_gate, b_down]
    (empty tensors for absent ones)."""
    n_exp = w_up_EFD.shape[0]
    glu = _present(w_gate_EFD)
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    grad_x_TD = torch.zeros_like(x_TD)
    idx_R = token_idx_N[lo:hi]
    x_RD = x_TD.index_select(0, idx_R)
    g_RD = grad_y_ND[lo:hi]
    up_RF = up_NF[lo:hi]
    if glu:
        gate_RF = gate_NF[lo:hi]
        h_RF = act(activation, gate_RF) * up_RF
    else:
        h_RF = act(activation, up_RF)
    grad_w_down = gmm_wgrad(g_RD, h_RF, local_E1, n_exp)  # [E, D, F]
    grad_h_RF = gmm(g_RD, w_down_EDF.transpose(1, 2), local_E1)  # g @ W_down[e]
    if glu:
        grad_up_RF = grad_h_RF * act(activation, gate_RF)
        grad_gate_RF = grad_h_RF * up_RF * act_grad(activation, gate_RF)
    else:
        grad_up_RF = grad_h_RF * act_grad(activation, up_RF)
        grad_gate_RF = None
    grad_w_up = gmm_wgrad(grad_up_RF, x_RD, local_E1, n_exp)
    grad_x_RD = gmm(grad_up_RF, w_up_EFD.transpose(1, 2), local_E1)
    grad_w_gate = _empty(x_TD)
    if grad_gate_RF is not None:
        grad_w_gate = gmm_wgrad(grad_gate_RF, x_RD, local_E1, n_exp)
        grad_x_RD = grad_x_RD + gmm(grad_gate_RF, w_gate_EFD.transpose(1, 2), local_E1)
    grad_x_TD.index_add_(0, idx_R, grad_x_RD)
    grads_b = [_empty(x_TD) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        counts = (local_E1[1:] - local_E1[:-1]).tolist()
        seg = lambda t: torch.stack([s.sum(0) for s in torch.split(t, counts)])  # noqa: E731
        grads_b = [seg(grad_up_RF), seg(grad_gate_RF) if glu else _empty(x_TD), seg(g_RD)]
    return [grad_x_TD, grad_w_up, grad_w_gate, grad_w_down, *grads_b]


@expert_ffn_backward.register_fake
def _(grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, up_NF,
      gate_NF, has_bias, activation):  # fmt: skip
    e, f, d = w_up_EFD.shape
    glu = w_gate_EFD.numel() > 0
    b = [x_TD.new_empty(e, f), x_TD.new_empty(e, f if glu else 0), x_TD.new_empty(e, d)]
    if not glu:
        b[1] = x_TD.new_empty(0)
    return [
        torch.empty_like(x_TD),
        torch.empty_like(w_up_EFD),
        torch.empty_like(w_gate_EFD) if glu else x_TD.new_empty(0),
        torch.empty_like(w_down_EDF),
        *(b if has_bias else [x_TD.new_empty(0) for _ in range(3)]),
    ]


def _setup(ctx, inputs, output) -> None:
    x, token_idx, offsets, first, w_up, w_gate, w_down, b_up, _b_gate, _b_down, activation = inputs
    _, up, gate = output
    ctx.save_for_backward(x, token_idx, offsets, w_up, w_gate, w_down, up, gate)
    ctx.first, ctx.activation, ctx.has_bias = first, activation, b_up.numel() > 0


def _backward(ctx, grad_y, _grad_up, _grad_gate):
    x, token_idx, offsets, w_up, w_gate, w_down, up, gate = ctx.saved_tensors
    g = torch.ops.moespec.expert_ffn_backward(
        grad_y.contiguous(), x, token_idx, offsets, ctx.first, w_up, w_gate, w_down, up, gate,
        ctx.has_bias, ctx.activation,
    )  # fmt: skip
    gx, gwu, gwg, gwd, gbu, gbg, gbd = g
    opt = lambda t: t if t.numel() > 0 else None  # noqa: E731
    return gx, None, None, None, gwu, opt(gwg), gwd, opt(gbu), opt(gbg), opt(gbd), None


expert_ffn.register_autograd(_backward, setup_context=_setup)
