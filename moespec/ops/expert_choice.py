"""``moespec::expert_choice_select``: expert-choice selection mask, one fused op.

Legend: T tokens, E experts, G groups, S tokens per group, C tokens per expert.

Input are the router scores S = softmax(logits) [T, E]; the output is the bool [T, E] mask
"expert e took token t": per group of ``group_size`` consecutive tokens (0: one group of all
T; the last group may be shorter), expert e takes the C tokens with the largest S[:, e],
C = min(max(round(cf · S / E), min_capacity), S), ties to the lower token index — exactly
:func:`moespec.reference.routers.expert_choice.expert_choice_selection`.

Instead of sorting every expert's column, one ``torch.topk`` over the [G, E, S] transpose
gives each expert's C-th largest score v; the expert takes every token above v and, of the
tokens equal to v, the first C - #above in token order (a cumulative count). That is the
stable-sort answer, deterministic on every device, at top-k cost. The mask carries no
gradient (the combine weights S[t, e] do, outside this op); the op is pure and has static
output shapes, so it exports with a dynamic T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.capacity import expert_choice_capacity


def _select(scores_GSE: Tensor, capacity: int) -> Tensor:
    """Bool [G, S, E]: per group, each expert's top-``capacity`` tokens (ties: lower index)."""
    n_tok = scores_GSE.shape[1]
    if capacity <= 0:
        return torch.zeros_like(scores_GSE, dtype=torch.bool)
    if capacity >= n_tok:
        return torch.ones_like(scores_GSE, dtype=torch.bool)
    s_GES = scores_GSE.transpose(1, 2)
    thr_GE1 = torch.topk(s_GES, capacity, dim=-1, sorted=True).values[..., capacity - 1 :]
    above_GES = s_GES > thr_GE1
    tie_GES = s_GES == thr_GE1
    room_GE1 = capacity - above_GES.sum(-1, keepdim=True)
    take_tie_GES = tie_GES & (tie_GES.cumsum(-1) <= room_GE1)
    return (above_GES | take_tie_GES).transpose(1, 2)


@torch.library.custom_op("moespec::expert_choice_select", mutates_args=())
def expert_choice_select(
    scores_TE: Tensor, capacity_factor: float, min_capacity: int, group_size: int
) -> Tensor:
    """Bool [T, E] expert-choice selection of ``scores_TE`` (see the module docstring)."""
    t_count, n_exp = scores_TE.shape
    size = group_size if 0 < group_size < t_count else t_count
    out_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    if t_count == 0:
        return out_TE
    n_full = t_count // size * size
    cap = expert_choice_capacity(size, n_exp, capacity_factor, min_capacity)
    out_TE[:n_full] = _select(scores_TE[:n_full].reshape(-1, size, n_exp), cap).reshape(n_full, n_exp)
    if n_full < t_count:
        rest = t_count - n_full
        cap = expert_choice_capacity(rest, n_exp, capacity_factor, min_capacity)
        out_TE[n_full:] = _select(scores_TE[n_full:].reshape(1, rest, n_exp), cap)[0]
    return out_TE


@expert_choice_select.register_fake
def _(scores_TE, capacity_factor, min_capacity, group_size):
    return torch.empty_like(scores_TE, dtype=torch.bool)
