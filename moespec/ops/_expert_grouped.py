"""Whole-group grouped-GEMM kernels of the expert ops (``moespec.ops.expert_ffn``), off the CPU.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert), R the group's rows [lo, hi).

The group's x rows are gathered once and each projection is one grouped GEMM
(``moespec.ops.gemm.gmm``: ``torch.nn.functional.grouped_mm`` where it applies). A group that
is the whole layer (the usual case) runs on all N rows with the dropped ones masked, so
nothing is read back to the host; the groups of a heterogeneous layer read their row range
(a device sync per group). Unlike the CPU kernels, these build whole-group [R, D]
temporaries.
With ``weight_N`` the forward also does the combine (weighted rows added into [T, D]) and the
backward starts from the [T, D] output gradient, as the CPU kernels (``_expert_cpu``) do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.ops._expert_weights import ExpertGrads, ExpertWeights
from moespec.ops.activations import act, act_backward_, glu_act, glu_grad_gate_, glu_grad_up_, glu_up
from moespec.ops.gemm import gmm, gmm_wgrad


@dataclass(frozen=True)
class _Rows:
    """The rows a group's kernels run on. A group that is the whole layer (``first`` = 0 and
    its experts are all of ``offsets_E1``) runs on every row with no host sync: rows past
    offsets[E] (dropped) are masked by ``valid_R1``. Another group reads its row range [lo, hi)
    on the host (``valid_R1`` None)."""

    lo: int
    idx_R: Tensor
    local_E1: Tensor
    n_valid: int | None  # gmm's n_valid: the row count when known on the host
    valid_R1: Tensor | None
    expert_R: Tensor | None  # each valid row's local expert (whole-layer groups)

    @staticmethod
    def of(token_idx_N: Tensor, offsets_E1: Tensor, first: int, n_exp: int) -> _Rows:
        if first == 0 and offsets_E1.shape[0] == n_exp + 1:
            n = token_idx_N.shape[0]
            arange_N = torch.arange(n, device=token_idx_N.device)
            valid_R1 = (arange_N < offsets_E1[-1]).unsqueeze(1)
            expert_R = torch.bucketize(arange_N, offsets_E1[1:], right=True).clamp_(max=n_exp - 1)
            return _Rows(0, token_idx_N, offsets_E1, None, valid_R1, expert_R)
        lo, hi = (int(v) for v in offsets_E1[[first, first + n_exp]].tolist())
        local_E1 = offsets_E1[first : first + n_exp + 1] - lo
        return _Rows(lo, token_idx_N[lo:hi], local_E1, hi - lo, None, None)

    @property
    def whole(self) -> bool:
        return self.valid_R1 is not None

    def per_row(self, b_EX: Tensor) -> Tensor:
        """Each row's entry of a per-expert tensor (zero on masked rows)."""
        if self.whole:
            return torch.where(self.valid_R1, b_EX[self.expert_R], 0)
        counts_E = self.local_E1[1:] - self.local_E1[:-1]
        return b_EX.repeat_interleave(counts_E, dim=0, output_size=self.n_valid)

    def mask(self, t_RX: Tensor) -> Tensor:
        """Rows past offsets[E] zeroed (whole-layer groups; others have none)."""
        return torch.where(self.valid_R1, t_RX, 0) if self.whole else t_RX

    def per_expert_sum(self, t_RX: Tensor, n_exp: int) -> Tensor:
        """[E, X]: the sum of each expert's rows."""
        if self.whole:
            return t_RX.new_zeros(n_exp, t_RX.shape[1]).index_add_(0, self.expert_R, self.mask(t_RX))
        counts = (self.local_E1[1:] - self.local_E1[:-1]).tolist()
        return torch.stack([s.sum(0) for s in torch.split(t_RX, counts)])

    def to_all(self, t_RX: Tensor, n_rows: int) -> Tensor:
        """[N, X] from the group's rows (zero outside them)."""
        if self.whole or (self.lo == 0 and t_RX.shape[0] == n_rows):
            return t_RX
        out = t_RX.new_zeros(n_rows, t_RX.shape[1])
        out[self.lo : self.lo + t_RX.shape[0]] = t_RX
        return out


def forward(
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w: ExpertWeights,
    activation: str,
    weight_N: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same results as ``_expert_cpu.forward``."""
    n_rows, n_exp, glu = token_idx_N.shape[0], w.w_up_EFD.shape[0], w.glu
    rows = _Rows.of(token_idx_N, offsets_E1, first, n_exp)
    x_RD = x_TD.index_select(0, rows.idx_R)
    up_RF = gmm(x_RD, w.w_up_EFD, rows.local_E1, n_valid=rows.n_valid)
    if w.has_bias:
        up_RF.add_(rows.per_row(w.b_up_EF))
    gate_RF = None
    if glu:
        gate_RF = gmm(x_RD, w.w_gate_EFD, rows.local_E1, n_valid=rows.n_valid)
        if w.has_bias:
            gate_RF.add_(rows.per_row(w.b_gate_EF))
        h_RF = glu_act(activation, gate_RF).mul_(glu_up(activation, up_RF))
    else:
        h_RF = act(activation, up_RF)
    y_RD = gmm(h_RF, w.w_down_EDF, rows.local_E1, n_valid=rows.n_valid)
    if w.has_bias:
        y_RD.add_(rows.per_row(w.b_down_ED))
    gate_NF = rows.to_all(gate_RF, n_rows) if glu else x_TD.new_empty(0)
    if weight_N is None:
        return rows.to_all(y_RD, n_rows), rows.to_all(up_RF, n_rows), gate_NF
    w_R1 = weight_N[rows.lo : rows.lo + y_RD.shape[0]].to(y_RD.dtype).unsqueeze(1)
    return (
        torch.zeros_like(x_TD).index_add_(0, rows.idx_R, y_RD.mul_(w_R1)),
        rows.to_all(up_RF, n_rows),
        gate_NF,
    )


def backward(
    grad_y: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w: ExpertWeights,
    up_NF: Tensor,
    gate_NF: Tensor,
    has_bias: bool,
    activation: str,
    weight_N: Tensor | None,
) -> ExpertGrads:
    """Same results as ``_expert_cpu.backward``."""
    n_exp, glu, combine = w.w_up_EFD.shape[0], w.glu, weight_N is not None
    rows = _Rows.of(token_idx_N, offsets_E1, first, n_exp)
    local_E1, n_valid, lo = rows.local_E1, rows.n_valid, rows.lo
    x_RD = x_TD.index_select(0, rows.idx_R)
    r = x_RD.shape[0]
    up_RF = up_NF[lo : lo + r]
    if glu:
        gate_RF = gate_NF[lo : lo + r]
        a_RF, u_RF = glu_act(activation, gate_RF), glu_up(activation, up_RF)
        h_RF = a_RF * u_RF
    else:
        h_RF = act(activation, up_RF)
    grad_w_N = None
    if combine:
        g0_RD = rows.mask(grad_y.index_select(0, rows.idx_R))  # unweighted
        grad_h_RF = gmm(g0_RD, w.w_down_EDF.transpose(1, 2), local_E1, n_valid=n_valid)
        # d w[n] = <h[n], g[n] W_down> (+ <b_down, g[n]>); the rows' gradient is w[n] g[n].
        grad_w_R = torch.linalg.vecdot(h_RF, grad_h_RF)
        if has_bias:
            grad_w_R += torch.linalg.vecdot(g0_RD, rows.per_row(w.b_down_ED))
        grad_w_N = rows.to_all(grad_w_R.unsqueeze(1), token_idx_N.shape[0]).squeeze(1)
        w_R1 = weight_N[lo : lo + r].to(x_TD.dtype).unsqueeze(1)
        g_RD, grad_h_RF = g0_RD * w_R1, grad_h_RF.mul_(w_R1)
    else:
        g_RD = rows.mask(grad_y[lo : lo + r])
        grad_h_RF = gmm(g_RD, w.w_down_EDF.transpose(1, 2), local_E1, n_valid=n_valid)  # g @ W_down[e]
    grad_w_down = gmm_wgrad(g_RD, h_RF, local_E1, n_exp)  # [E, D, F]
    if glu:
        grad_up_RF = glu_grad_up_(activation, a_RF.mul_(grad_h_RF), up_RF)
        grad_gate_RF = glu_grad_gate_(activation, grad_h_RF.mul_(u_RF), gate_RF)
    else:
        grad_up_RF = act_backward_(activation, grad_h_RF, up_RF)
        grad_gate_RF = None
    grad_w_up = gmm_wgrad(grad_up_RF, x_RD, local_E1, n_exp)
    grad_x_RD = gmm(grad_up_RF, w.w_up_EFD.transpose(1, 2), local_E1, n_valid=n_valid)
    grad_w_gate = x_TD.new_empty(0)
    if grad_gate_RF is not None:
        grad_w_gate = gmm_wgrad(grad_gate_RF, x_RD, local_E1, n_exp)
        grad_x_RD.add_(gmm(grad_gate_RF, w.w_gate_EFD.transpose(1, 2), local_E1, n_valid=n_valid))
    grad_x_TD = torch.zeros_like(x_TD).index_add_(0, rows.idx_R, grad_x_RD)
    grads_b = [x_TD.new_empty(0) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        seg = lambda t: rows.per_expert_sum(t, n_exp)  # noqa: E731
        grads_b = [seg(grad_up_RF), seg(grad_gate_RF) if glu else x_TD.new_empty(0), seg(g_RD)]
    grad_w = ExpertWeights(grad_w_up, grad_w_gate, grad_w_down, *grads_b)
    return ExpertGrads(grad_x_TD, grad_w, grad_w_N.to(weight_N.dtype) if combine else None)
