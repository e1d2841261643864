"""``moespec::sort_by_expert`` and ``moespec::combine``: the two ends of the grouped GEMM.

Legend: T tokens, K selections per token, E experts, N = T*K routed rows, D d_model.

sort_by_expert turns per-token choices ``idx_TK`` (and a keep mask from capacity) into the
central routing result of ARCHITECTURE.md: rows sorted by expert (stable, so tokens keep
their order inside an expert), dropped rows moved to the end under the sentinel expert E,
and ``offsets_E1`` with offsets[E] = kept rows. Shapes are static (N = T*K), so the op needs
no dynamic-size fake and exports with a dynamic T.

combine scatters weighted expert rows back to tokens: y[t] = sum_n [token_idx[n] = t] w[n] h[n].
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.ops import _buffers


@torch.library.custom_op("moespec::sort_by_expert", mutates_args=())
def sort_by_expert(idx_TK: Tensor, keep_TK: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(token_idx_N, slot_N, offsets_E1)``; ``slot_N`` indexes the flattened [T*K]
    choices (to gather weights), ``offsets_E1`` is int64 with offsets[0] = 0."""
    k = idx_TK.shape[1]
    expert_N = torch.where(keep_TK, idx_TK, n_experts).reshape(-1)
    slot_N = torch.argsort(expert_N, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx_TK.device)
    counts.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.int64, device=idx_TK.device)
    offsets_E1[1:] = torch.cumsum(counts[:n_experts], 0)
    return torch.div(slot_N, k, rounding_mode="floor"), slot_N, offsets_E1


@sort_by_expert.register_fake
def _(idx_TK, keep_TK, n_experts):
    n = idx_TK.shape[0] * idx_TK.shape[1]
    i64 = dict(dtype=torch.int64, device=idx_TK.device)
    return idx_TK.new_empty(n, **i64), idx_TK.new_empty(n, **i64), idx_TK.new_empty(n_experts + 1, **i64)


# CPU: combine in row blocks so the weighted rows live in a small, cache-sized temporary
# (a whole [N, D] temporary can exceed malloc's mmap threshold and page-fault on every call).
_COMBINE_BLOCK_BYTES = 2 << 20


def _row_blocks(t: Tensor) -> list[tuple[int, int]]:
    n = t.shape[0]
    if t.device.type != "cpu":
        return [(0, n)]
    step = max(256, _COMBINE_BLOCK_BYTES // max(1, t.shape[1] * t.element_size()))
    return [(r, min(r + step, n)) for r in range(0, n, step)]


@torch.library.custom_op("moespec::combine", mutates_args=())
def combine(h_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, n_tokens: int) -> Tensor:
    """y_TD[t] = sum over rows n of token t of weight_N[n] * h_ND[n] (weight 0 skips a row)."""
    y_TD = _buffers.zeros((n_tokens, h_ND.shape[1]), h_ND)
    w_N1 = weight_N.unsqueeze(1).to(h_ND.dtype)
    blocks = _row_blocks(h_ND)
    tmp = h_ND.new_empty(max((hi - lo for lo, hi in blocks), default=0), h_ND.shape[1])
    for lo, hi in blocks:
        y_TD.index_add_(0, token_idx_N[lo:hi], torch.mul(h_ND[lo:hi], w_N1[lo:hi], out=tmp[: hi - lo]))
    return y_TD


@combine.register_fake
def _(h_ND, token_idx_N, weight_N, n_tokens):
    return h_ND.new_empty(n_tokens, h_ND.shape[1])


def _combine_setup(ctx, inputs, output) -> None:
    h, token_idx, weight, _ = inputs
    ctx.save_for_backward(h, token_idx, weight)


def _combine_backward(ctx, grad_y_TD):
    h, token_idx, weight = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    double = torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y_TD, h, weight))
    if double or _buffers.tracing(h.shape):
        # create_graph=True: differentiable out-of-place ops (double backward). Traced by
        # torch.compile / export (sizes may be data-dependent): the same plain formula.
        g_ND = grad_y_TD.index_select(0, token_idx)
        grad_w = (g_ND * h).sum(1).to(weight.dtype)
        return g_ND * weight.unsqueeze(1).to(g_ND.dtype), None, grad_w, None
    # Per block: g[token] gathered into a cache-sized temporary, grad_w = <g[token], h> read
    # from it, grad_h = g[token] * w written once.
    grad_h = _buffers.empty_like(h)
    grad_w = weight.new_empty(weight.shape) if need_w else None
    w_N1 = weight.unsqueeze(1).to(grad_h.dtype)
    g_TD = grad_y_TD.to(grad_h.dtype)
    blocks = _row_blocks(h)
    tmp = h.new_empty(max((hi - lo for lo, hi in blocks), default=0), h.shape[1])
    for lo, hi in blocks:
        g_BD = torch.index_select(g_TD, 0, token_idx[lo:hi], out=tmp[: hi - lo])
        if grad_w is not None and grad_w.dtype == g_BD.dtype:
            torch.linalg.vecdot(g_BD, h[lo:hi], out=grad_w[lo:hi])
        elif grad_w is not None:
            grad_w[lo:hi] = torch.linalg.vecdot(g_BD, h[lo:hi])
        torch.mul(g_BD, w_N1[lo:hi], out=grad_h[lo:hi])
    return grad_h if need_h else None, None, grad_w, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
