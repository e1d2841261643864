"""CPU expert forward for few rows per expert (``moespec.ops._expert_cpu`` picks it): where the
work is GEMV-shaped, the calls around the GEMMs cost more than the GEMMs.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert), R the group's rows, r the busiest expert's rows.

- :func:`forward_few`: few rows in all (decode, short prompts): each expert with rows runs
  only its GEMM calls on its slice of the rows; the gather, the activation and the weighted
  sum per token run once over all rows, with none of the blocked path's row bookkeeping.
- :func:`forward_padded`: many experts with a few rows each (short prompts of fine-grained
  MoEs): three batched GEMMs over every expert, rows padded to the busiest expert's count.
Both give the blocked path's results up to the GEMMs' summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.ops._expert_weights import ExpertWeights
from moespec.ops.activations import act

# forward_few: at most this many routed rows in the group (measured: up to 256 rows it beats the
# blocked and the padded paths at the Mixtral-like and the fine-grained E128 shapes, eval).
FEW_ROWS = 256
# forward_padded: groups of at least this many experts, at most this many rows on the busiest
# one, and at least half the experts with rows.
_PADDED_MIN_EXPERTS = 16
_PADDED_MAX_ROWS = 32


def forward_few(x_TD: Tensor, token_idx_N: Tensor, bounds: list[int], first: int, w: ExpertWeights,
                activation: str, weight_N: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(y, up_NF, gate_NF)`` as ``_expert_cpu.forward`` returns them (``bounds``: the
    offsets as host ints). The group's x rows are gathered once, each expert's GEMMs write its
    slice of the rows, and the elementwise work (activation, routing weight, the sum per
    token) runs once over all rows: per expert only its GEMM calls."""
    (n_exp, f), n_rows, d = w.w_up_EFD.shape[:2], token_idx_N.shape[0], x_TD.shape[1]
    lo, hi, glu, bias = bounds[first], bounds[first + n_exp], w.glu, w.has_bias
    up_NF = x_TD.new_zeros(n_rows, f)
    gate_NF = x_TD.new_zeros(n_rows, f) if glu else x_TD.new_empty(0)
    tok_R = token_idx_N[lo:hi]
    x_RD = x_TD.index_select(0, tok_R)
    spans = [(e, bounds[first + e], bounds[first + e + 1]) for e in range(n_exp)]
    spans = [(e, r0, r1) for e, r0, r1 in spans if r1 > r0]
    for e, r0, r1 in spans:
        x_BD = x_RD[r0 - lo : r1 - lo]
        _linear(x_BD, w.w_up_EFD[e], w.b_up_EF[e] if bias else None, up_NF[r0:r1])
        if glu:
            _linear(x_BD, w.w_gate_EFD[e], w.b_gate_EF[e] if bias else None, gate_NF[r0:r1])
    h_RF = act(activation, gate_NF[lo:hi]).mul_(up_NF[lo:hi]) if glu else act(activation, up_NF[lo:hi])
    y_RD = x_TD.new_empty(hi - lo, d)
    for e, r0, r1 in spans:
        _linear(
            h_RF[r0 - lo : r1 - lo],
            w.w_down_EDF[e],
            w.b_down_ED[e] if bias else None,
            y_RD[r0 - lo : r1 - lo],
        )
    if weight_N is None:
        y_ND = x_TD.new_zeros(n_rows, d)
        y_ND[lo:hi] = y_RD
        return y_ND, up_NF, gate_NF
    # The routing weight scales each row (rounded to its dtype, as the blocked path does); rows
    # are added per token in row order (index_add_ on the CPU is sequential: deterministic).
    y_RD.mul_(weight_N[lo:hi].to(y_RD.dtype).unsqueeze(1))
    return x_TD.new_zeros(x_TD.shape).index_add_(0, tok_R, y_RD), up_NF, gate_NF


def _linear(a_BK: Tensor, w_MK: Tensor, b_M: Tensor | None, out: Tensor | None) -> Tensor:
    """a @ w^T (+ b), into ``out`` when given."""
    if b_M is None:
        return torch.mm(a_BK, w_MK.t(), out=out) if out is not None else torch.mm(a_BK, w_MK.t())
    return torch.addmm(b_M, a_BK, w_MK.t(), out=out) if out is not None else torch.addmm(b_M, a_BK, w_MK.t())


def padded_fits(counts: list[int]) -> bool:
    """Whether the padded batched path pays: many experts holding few rows each (decode, short
    prompts of fine-grained MoEs), where a GEMM call per expert costs more than the work."""
    n_exp, busiest = len(counts), max(counts, default=0)
    active = sum(c > 0 for c in counts)
    return n_exp >= _PADDED_MIN_EXPERTS and 2 * active >= n_exp and 0 < busiest <= _PADDED_MAX_ROWS


def forward_padded(x_TD: Tensor, tok_R: Tensor, lo: int, counts: list[int], w: ExpertWeights, activation: str,
                   outs: tuple[Tensor, Tensor, Tensor]) -> None:  # fmt: skip
    """The forward as three batched GEMMs over every expert of the group, each expert's rows
    padded with zero rows to the busiest expert's count r ([E, r, D] @ [E, D, F]); the
    padding rows are computed and dropped. Same results as the blocked path, up to the
    GEMMs' summation order."""
    up_NF, gate_NF, y_ND = outs
    n_exp, r, rows = len(counts), max(counts), tok_R.shape[0]
    d, f = x_TD.shape[1], w.w_up_EFD.shape[1]
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    e_R = torch.repeat_interleave(torch.arange(n_exp), torch.tensor(counts), output_size=rows)
    slot_R = e_R * r + torch.arange(rows) - torch.tensor(starts)[e_R]  # row's place in [E * r]
    x_ErD = x_TD.new_zeros(n_exp * r, d).index_copy_(0, slot_R, x_TD.index_select(0, tok_R))
    x_ErD = x_ErD.view(n_exp, r, d)
    up_ErF = torch.bmm(x_ErD, w.w_up_EFD.transpose(1, 2))
    if w.has_bias:
        up_ErF += w.b_up_EF.unsqueeze(1)
    if w.glu:
        gate_ErF = torch.bmm(x_ErD, w.w_gate_EFD.transpose(1, 2))
        if w.has_bias:
            gate_ErF += w.b_gate_EF.unsqueeze(1)
        torch.index_select(gate_ErF.view(-1, f), 0, slot_R, out=gate_NF[lo : lo + rows])
        h_ErF = act(activation, gate_ErF).mul_(up_ErF)
    else:
        h_ErF = act(activation, up_ErF)
    torch.index_select(up_ErF.view(-1, f), 0, slot_R, out=up_NF[lo : lo + rows])
    y_ErD = torch.bmm(h_ErF, w.w_down_EDF.transpose(1, 2))
    if w.has_bias:
        y_ErD += w.b_down_ED.unsqueeze(1)
    torch.index_select(y_ErD.view(-1, d), 0, slot_R, out=y_ND[lo : lo + rows])
