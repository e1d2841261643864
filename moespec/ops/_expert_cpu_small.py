"""CPU expert forward for few rows per expert (``moespec.ops._expert_cpu`` picks it where
:func:`takes` says so): where the GEMMs are small, the calls around them cost more than they.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert), R the group's rows.

:func:`forward_few` (decode, short prompts, fine-grained MoEs): each expert with rows runs
only its GEMM calls on its slice of the rows; the gather, the activation and the weighted sum
per token run once over all rows, with none of the blocked path's row bookkeeping. The
results are the blocked path's up to the GEMMs' summation order.
"""

from __future__ import annotations

from torch import Tensor

from moespec.ops._expert_weights import ExpertWeights
from moespec.ops.activations import act, glu_act, glu_up
from moespec.ops.gemm import linear_into

# forward_few takes a group of at most FEW_ROWS routed rows, or of at most FEW_ROWS_PER_EXPERT
# rows per expert with rows: measured in eval at the Mixtral-like (E8) and fine-grained (E128)
# shapes, it beats the blocked path there (fine-grained, 256 tokens: 15.3 vs 20.9 ms) and loses
# beyond (Mixtral-like, 1024 tokens, 256 rows per expert: 37.7 vs 28.7 ms).
FEW_ROWS = 256
FEW_ROWS_PER_EXPERT = 64


def takes(counts: list[int]) -> bool:
    """Whether :func:`forward_few` runs a group whose experts hold ``counts`` rows."""
    rows, active = sum(counts), sum(c > 0 for c in counts)
    return rows <= FEW_ROWS or rows <= FEW_ROWS_PER_EXPERT * active


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
        linear_into(x_BD, w.w_up_EFD[e].t(), w.b_up_EF[e] if bias else None, up_NF[r0:r1])
        if glu:
            linear_into(x_BD, w.w_gate_EFD[e].t(), w.b_gate_EF[e] if bias else None, gate_NF[r0:r1])
    h_RF = (
        glu_act(activation, gate_NF[lo:hi]).mul_(glu_up(activation, up_NF[lo:hi]))
        if glu
        else act(activation, up_NF[lo:hi])
    )
    y_RD = x_TD.new_empty(hi - lo, d)
    for e, r0, r1 in spans:
        linear_into(
            h_RF[r0 - lo : r1 - lo],
            w.w_down_EDF[e].t(),
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
