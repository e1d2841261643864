"""``moespec::sort_selected``: the central sorted routing of a dense-form selection.

Legend: T tokens, E experts, N selected (token, expert) pairs.

Routers whose number of experts per token varies (expert choice, ReLU, top-p, ...) produce
a [T, E] selection mask. This op lists the selected pairs sorted by expert (tokens in order
inside an expert) and returns the same triple as ``moespec::sort_by_expert``:
``(token_idx_N, slot_N, offsets_E1)`` with ``slot_N = t * E + e`` indexing the flattened
[T, E] gates. N is data-dependent (the fake registers an unbacked size), so only selected
pairs reach the experts: no [T*E, ...] buffers.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("moespec::sort_selected", mutates_args=())
def sort_selected(selected_TE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Selected pairs of ``selected_TE`` (bool [T, E]) sorted by expert, then token."""
    n_exp = selected_TE.shape[1]
    # nonzero() of the [E, T] transpose walks expert-major, tokens ascending within an expert.
    e_N, t_N = selected_TE.t().nonzero(as_tuple=True)
    # as_tuple gives views into one buffer (at an offset); outputs must own aligned,
    # contiguous storage (inductor checks custom-op outputs' alignment).
    t_N = t_N.clone()
    counts_E = selected_TE.sum(0)
    offsets_E1 = torch.zeros(n_exp + 1, dtype=torch.int64, device=selected_TE.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return t_N, t_N * n_exp + e_N, offsets_E1


@sort_selected.register_fake
def _(selected_TE):
    n = torch.library.get_ctx().new_dynamic_size()
    i64 = dict(dtype=torch.int64, device=selected_TE.device)
    return (
        selected_TE.new_empty(n, **i64),
        selected_TE.new_empty(n, **i64),
        selected_TE.new_empty(selected_TE.shape[1] + 1, **i64),
    )
