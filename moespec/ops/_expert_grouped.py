"""Whole-group grouped-GEMM kernels of the expert ops (``moespec.ops.expert_ffn``), off the CPU.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert), R the group's rows [lo, hi).

The group's x rows are gathered once and each projection is one grouped GEMM
(``moespec.ops.gemm.gmm``: ``torch.nn.functional.grouped_mm`` where it applies). The group's
row offsets (and per-expert bias rows and counts) are read on the host: a device sync per
call, which a device-side kernel (the planned Triton backend) would avoid. Unlike the CPU
kernels, these build whole-group [R, D] temporaries.
With ``weight_N`` the forward also does the combine (weighted rows added into [T, D]) and the
backward starts from the [T, D] output gradient, as the CPU kernels (``_expert_cpu``) do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.ops.activations import act, act_backward_
from moespec.ops.gemm import gmm, gmm_wgrad


def _group_rows(offsets_E1: Tensor, first: int, n_experts: int) -> tuple[int, int, Tensor]:
    lo, hi = offsets_E1[first].item(), offsets_E1[first + n_experts].item()
    return int(lo), int(hi), offsets_E1[first : first + n_experts + 1] - lo


def _per_row(b_EX: Tensor, local_E1: Tensor) -> Tensor:
    counts_E = local_E1[1:] - local_E1[:-1]
    return b_EX.repeat_interleave(counts_E, dim=0, output_size=int(local_E1[-1].item()))


def _scatter_rows(t_RX: Tensor, n_rows: int, lo: int) -> Tensor:
    out = t_RX.new_zeros(n_rows, t_RX.shape[1])
    out[lo : lo + t_RX.shape[0]] = t_RX
    return out


def forward(
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
    weight_N: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same results as ``_expert_cpu.forward``."""
    n_rows, n_exp, f = token_idx_N.shape[0], w_up_EFD.shape[0], w_up_EFD.shape[1]
    glu = w_gate_EFD.numel() > 0
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    if hi == lo:
        gate_NF = x_TD.new_zeros(n_rows, f) if glu else x_TD.new_empty(0)
        y = torch.zeros_like(x_TD) if weight_N is not None else x_TD.new_zeros(n_rows, x_TD.shape[1])
        return y, x_TD.new_zeros(n_rows, f), gate_NF
    idx_R = token_idx_N[lo:hi]
    x_RD = x_TD.index_select(0, idx_R)
    rows = hi - lo  # == local_E1[-1]: no row of x_RD is past the group's last offset
    up_RF = gmm(x_RD, w_up_EFD, local_E1, n_valid=rows)
    if b_up_EF.numel() > 0:
        up_RF.add_(_per_row(b_up_EF, local_E1))
    gate_RF = None
    if glu:
        gate_RF = gmm(x_RD, w_gate_EFD, local_E1, n_valid=rows)
        if b_gate_EF.numel() > 0:
            gate_RF.add_(_per_row(b_gate_EF, local_E1))
        h_RF = act(activation, gate_RF).mul_(up_RF)
    else:
        h_RF = act(activation, up_RF)
    y_RD = gmm(h_RF, w_down_EDF, local_E1, n_valid=rows)
    if b_down_ED.numel() > 0:
        y_RD.add_(_per_row(b_down_ED, local_E1))
    whole = lo == 0 and hi == n_rows  # the group covers every row: its results are the outputs
    rows_out = (lambda t: t) if whole else (lambda t: _scatter_rows(t, n_rows, lo))
    gate_NF = rows_out(gate_RF) if glu else x_TD.new_empty(0)
    if weight_N is None:
        return rows_out(y_RD), rows_out(up_RF), gate_NF
    y_RD.mul_(weight_N[lo:hi].to(y_RD.dtype).unsqueeze(1))
    return torch.zeros_like(x_TD).index_add_(0, idx_R, y_RD), rows_out(up_RF), gate_NF


def backward(
    grad_y: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    b_down_ED: Tensor,
    up_NF: Tensor,
    gate_NF: Tensor,
    has_bias: bool,
    activation: str,
    weight_N: Tensor | None,
) -> list[Tensor]:
    """Same results as ``_expert_cpu.backward``."""
    n_exp = w_up_EFD.shape[0]
    glu, combine = w_gate_EFD.numel() > 0, weight_N is not None
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    rows = hi - lo
    grad_x_TD = torch.zeros_like(x_TD)
    idx_R = token_idx_N[lo:hi]
    x_RD = x_TD.index_select(0, idx_R)
    up_RF = up_NF[lo:hi]
    if glu:
        gate_RF = gate_NF[lo:hi]
        a_RF = act(activation, gate_RF)
        h_RF = a_RF * up_RF
    else:
        h_RF = act(activation, up_RF)
    grad_w_N = None
    if combine:
        g0_RD = grad_y.index_select(0, idx_R)  # unweighted
        grad_h_RF = gmm(g0_RD, w_down_EDF.transpose(1, 2), local_E1, n_valid=rows)
        # d w[n] = <h[n], g[n] W_down> (+ <b_down, g[n]>); the rows' gradient is w[n] g[n].
        grad_w_R = torch.linalg.vecdot(h_RF, grad_h_RF)
        if has_bias:
            grad_w_R += torch.linalg.vecdot(g0_RD, _per_row(b_down_ED, local_E1))
        grad_w_N = torch.zeros(token_idx_N.shape[0], dtype=x_TD.dtype, device=x_TD.device)
        grad_w_N[lo:hi] = grad_w_R
        w_R1 = weight_N[lo:hi].to(x_TD.dtype).unsqueeze(1)
        g_RD, grad_h_RF = g0_RD * w_R1, grad_h_RF.mul_(w_R1)
    else:
        g_RD = grad_y[lo:hi]
        grad_h_RF = gmm(g_RD, w_down_EDF.transpose(1, 2), local_E1, n_valid=rows)  # g @ W_down[e]
    grad_w_down = gmm_wgrad(g_RD, h_RF, local_E1, n_exp)  # [E, D, F]
    if glu:
        grad_up_RF = a_RF.mul_(grad_h_RF)
        grad_gate_RF = act_backward_(activation, grad_h_RF.mul_(up_RF), gate_RF)
    else:
        grad_up_RF = act_backward_(activation, grad_h_RF, up_RF)
        grad_gate_RF = None
    grad_w_up = gmm_wgrad(grad_up_RF, x_RD, local_E1, n_exp)
    grad_x_RD = gmm(grad_up_RF, w_up_EFD.transpose(1, 2), local_E1, n_valid=rows)
    grad_w_gate = x_TD.new_empty(0)
    if grad_gate_RF is not None:
        grad_w_gate = gmm_wgrad(grad_gate_RF, x_RD, local_E1, n_exp)
        grad_x_RD.add_(gmm(grad_gate_RF, w_gate_EFD.transpose(1, 2), local_E1, n_valid=rows))
    grad_x_TD.index_add_(0, idx_R, grad_x_RD)
    grads_b = [x_TD.new_empty(0) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        counts = (local_E1[1:] - local_E1[:-1]).tolist()
        seg = lambda t: torch.stack([s.sum(0) for s in torch.split(t, counts)])  # noqa: E731
        grads_b = [seg(grad_up_RF), seg(grad_gate_RF) if glu else x_TD.new_empty(0), seg(g_RD)]
    out = [grad_x_TD, grad_w_up, grad_w_gate, grad_w_down, *grads_b]
    if combine:
        out.append(grad_w_N.to(weight_N.dtype))
    return out
