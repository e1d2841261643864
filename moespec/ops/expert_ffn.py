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

CPU kernels are blocked: one expert's rows at a time (split into blocks of at most
``_BLOCK_BYTES`` of [rows, max(F, D)] temporaries), gathering the block's x rows, with every
GEMM writing straight into its output slice (``torch.mm(out=)``, bias via ``addmm``), the
activation fused in place, and the backward recomputing act(gate) per block from the saved
pre-activations with ATen's fused ``*_backward`` kernels. No [N, *] temporary is allocated
(a fresh tensor of 32 MiB or more is mmapped by glibc and page-faults on every call), no
output is zero-filled then copied, no masking pass runs. Off the CPU the op runs whole-group
grouped GEMMs (``moespec.ops.gemm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moespec.ops import _buffers, _parallel
from moespec.ops.activations import act, act_backward_
from moespec.ops.gemm import expert_blocks, gmm, gmm_wgrad

# CPU: the blocked kernels (one expert's row block at a time, temporaries sized to stay in
# cache, GEMMs writing outputs in place). Off the CPU, whole-group grouped GEMMs.
_BLOCKED_CPU = True
_BLOCK_BYTES = 4 << 20  # one block's widest temporary, [rows, max(F, D)], at most this
_MIN_BLOCK_ROWS = 256
# Blocks run in parallel (one single-threaded worker per intra-op thread) once a group's
# rows x D x F reaches _PARALLEL_MIN_MACS (below it the hand-off costs more than it saves),
# while its blocks are small: rows x D x F per block below _PARALLEL_MAX_BLOCK_MACS (larger
# GEMMs run faster split over the threads by BLAS, e.g. Mixtral-like 1024 x 512 x 1024).
_PARALLEL_MIN_MACS = 1 << 24
_PARALLEL_MAX_BLOCK_MACS = 1 << 26


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
    if x_TD.device.type == "cpu" and _BLOCKED_CPU:
        return _forward_blocked(
            x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF,
            b_down_ED, activation,
        )  # fmt: skip
    n_rows, n_exp, f = token_idx_N.shape[0], w_up_EFD.shape[0], w_up_EFD.shape[1]
    glu = _present(w_gate_EFD)
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    whole = lo == 0 and hi == n_rows  # the group covers every row: its results are the outputs
    if hi == lo:
        gate_NF = x_TD.new_zeros(n_rows, f) if glu else _empty(x_TD)
        return x_TD.new_zeros(n_rows, x_TD.shape[1]), x_TD.new_zeros(n_rows, f), gate_NF
    x_RD = x_TD.index_select(0, token_idx_N[lo:hi])
    rows = hi - lo  # == local_E1[-1]: no row of x_RD is past the group's last offset
    up_RF = gmm(x_RD, w_up_EFD, local_E1, n_valid=rows)
    if _present(b_up_EF):
        up_RF.add_(_per_row(b_up_EF, local_E1))
    if glu:
        gate_RF = gmm(x_RD, w_gate_EFD, local_E1, n_valid=rows)
        if _present(b_gate_EF):
            gate_RF.add_(_per_row(b_gate_EF, local_E1))
        h_RF = act(activation, gate_RF).mul_(up_RF)
    else:
        h_RF = act(activation, up_RF)
    y_RD = gmm(h_RF, w_down_EDF, local_E1, n_valid=rows)
    if _present(b_down_ED):
        y_RD.add_(_per_row(b_down_ED, local_E1))
    if whole:
        return y_RD, up_RF, gate_RF if glu else _empty(x_TD)
    return (
        _scatter_rows(y_RD, n_rows, lo),
        _scatter_rows(up_RF, n_rows, lo),
        (_scatter_rows(gate_RF, n_rows, lo) if glu else _empty(x_TD)),
    )


def _scatter_rows(t_RX: Tensor, n_rows: int, lo: int) -> Tensor:
    out = t_RX.new_zeros(n_rows, t_RX.shape[1])
    out[lo : lo + t_RX.shape[0]] = t_RX
    return out


def _zero_outside(t: Tensor, lo: int, hi: int) -> Tensor:
    t[:lo].zero_()
    t[hi:].zero_()
    return t


def _block_rows(*widths: int, elt: int) -> int:
    return max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (max(widths) * elt))


def _blocks(
    bounds: list[int], first: int, n_exp: int, f: int, d: int, elt: int
) -> tuple[list[int], list[int]]:
    """Experts and row counts of the group's row blocks, in row order from bounds[first]."""
    blocks = list(expert_blocks(bounds, first, n_exp, _block_rows(f, d, elt=elt)))
    return [e for e, _, _ in blocks], [r1 - r0 for _, r0, r1 in blocks]


def _forward_blocked(x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF,
                     b_gate_EF, b_down_ED, activation):  # fmt: skip
    """CPU: one pass per row block of one expert; GEMMs write the outputs' slices in place."""
    n_rows, d = token_idx_N.shape[0], x_TD.shape[1]
    n_exp, f = w_up_EFD.shape[0], w_up_EFD.shape[1]
    glu, bias = _present(w_gate_EFD), _present(b_up_EF)
    bounds = offsets_E1.tolist()
    lo, hi = bounds[first], bounds[first + n_exp]
    new = lambda *shape: _buffers.empty(shape, x_TD.dtype, x_TD.device)  # noqa: E731
    y_ND = _zero_outside(new(n_rows, d), lo, hi)
    up_NF = _zero_outside(new(n_rows, f), lo, hi)
    gate_NF = _zero_outside(new(n_rows, f), lo, hi) if glu else _empty(x_TD)
    if hi == lo:
        return y_ND, up_NF, gate_NF
    experts, sizes = _blocks(bounds, first, n_exp, f, d, x_TD.element_size())
    # Per-block views made in one call each (cheaper than indexing per block in Python).
    idx_b = token_idx_N[lo:hi].split(sizes)
    up_b, y_b = up_NF[lo:hi].split(sizes), y_ND[lo:hi].split(sizes)
    gate_b = gate_NF[lo:hi].split(sizes) if glu else None
    w_up = w_up_EFD.transpose(1, 2).unbind(0)  # [D, F] per expert
    w_gate = w_gate_EFD.transpose(1, 2).unbind(0) if glu else None
    w_down = w_down_EDF.transpose(1, 2).unbind(0)  # [F, D]
    b_up = b_up_EF.unbind(0) if bias else None
    b_gate = b_gate_EF.unbind(0) if bias and glu else None
    b_down = b_down_ED.unbind(0) if bias else None

    def block(i: int) -> None:
        e = experts[i]
        x_BD = x_TD.index_select(0, idx_b[i])
        up_BF = _linear(x_BD, w_up[e], b_up[e] if b_up else None, up_b[i])
        if gate_b is not None:
            gate_BF = _linear(x_BD, w_gate[e], b_gate[e] if b_gate else None, gate_b[i])
            h_BF = act(activation, gate_BF).mul_(up_BF)
        else:
            h_BF = act(activation, up_BF)
        _linear(h_BF, w_down[e], b_down[e] if b_down else None, y_b[i])

    n_par = _n_parallel(len(experts), hi - lo, d, f)
    if n_par == 1:
        for i in range(len(experts)):
            block(i)
        return y_ND, up_NF, gate_NF
    todo = iter(range(len(experts)))  # shared: each worker takes the next block when done

    def piece() -> None:
        for i in todo:
            block(i)

    _parallel.run([piece] * n_par)
    return y_ND, up_NF, gate_NF


def _n_parallel(n_blocks: int, rows: int, d: int, f: int) -> int:
    """Workers for a group's blocks: one per intra-op thread when the work is large enough."""
    macs = rows * d * f
    if n_blocks < 2 or macs < _PARALLEL_MIN_MACS or macs >= _PARALLEL_MAX_BLOCK_MACS * n_blocks:
        return 1
    return min(_parallel.threads(), n_blocks)


def _split(experts: list[int], sizes: list[int], n: int) -> list[list[int]]:
    """Block indices in ``n`` consecutive runs of about equal rows, never splitting an expert
    (its weight gradients accumulate over its blocks in one worker)."""
    total, parts, cur, done = sum(sizes), [[] for _ in range(n)], 0, 0
    for i, (e, r) in enumerate(zip(experts, sizes, strict=True)):
        new_expert = i == 0 or experts[i - 1] != e
        if new_expert and cur < n - 1 and done >= total * (cur + 1) / n and parts[cur]:
            cur += 1
        parts[cur].append(i)
        done += r
    return [p for p in parts if p]


def _linear(a: Tensor, w_t: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    """out = a @ w_t (+ b), written into ``out``."""
    if b is None:
        return torch.mm(a, w_t, out=out)
    return torch.addmm(b, a, w_t, out=out)


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
    if x_TD.device.type == "cpu" and _BLOCKED_CPU:
        return _backward_blocked(
            grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, up_NF,
            gate_NF, has_bias, activation,
        )  # fmt: skip
    n_exp = w_up_EFD.shape[0]
    glu = _present(w_gate_EFD)
    lo, hi, local_E1 = _group_rows(offsets_E1, first, n_exp)
    rows = hi - lo
    grad_x_TD = torch.zeros_like(x_TD)
    idx_R = token_idx_N[lo:hi]
    x_RD = x_TD.index_select(0, idx_R)
    g_RD = grad_y_ND[lo:hi]
    up_RF = up_NF[lo:hi]
    if glu:
        gate_RF = gate_NF[lo:hi]
        a_RF = act(activation, gate_RF)
        h_RF = a_RF * up_RF
    else:
        h_RF = act(activation, up_RF)
    grad_w_down = gmm_wgrad(g_RD, h_RF, local_E1, n_exp)  # [E, D, F]
    grad_h_RF = gmm(g_RD, w_down_EDF.transpose(1, 2), local_E1, n_valid=rows)  # g @ W_down[e]
    if glu:
        grad_up_RF = a_RF.mul_(grad_h_RF)
        grad_gate_RF = act_backward_(activation, grad_h_RF.mul_(up_RF), gate_RF)
    else:
        grad_up_RF = act_backward_(activation, grad_h_RF, up_RF)
        grad_gate_RF = None
    grad_w_up = gmm_wgrad(grad_up_RF, x_RD, local_E1, n_exp)
    grad_x_RD = gmm(grad_up_RF, w_up_EFD.transpose(1, 2), local_E1, n_valid=rows)
    grad_w_gate = _empty(x_TD)
    if grad_gate_RF is not None:
        grad_w_gate = gmm_wgrad(grad_gate_RF, x_RD, local_E1, n_exp)
        grad_x_RD.add_(gmm(grad_gate_RF, w_gate_EFD.transpose(1, 2), local_E1, n_valid=rows))
    grad_x_TD.index_add_(0, idx_R, grad_x_RD)
    grads_b = [_empty(x_TD) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        counts = (local_E1[1:] - local_E1[:-1]).tolist()
        seg = lambda t: torch.stack([s.sum(0) for s in torch.split(t, counts)])  # noqa: E731
        grads_b = [seg(grad_up_RF), seg(grad_gate_RF) if glu else _empty(x_TD), seg(g_RD)]
    return [grad_x_TD, grad_w_up, grad_w_gate, grad_w_down, *grads_b]


def _backward_blocked(grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF,
                      up_NF, gate_NF, has_bias, activation):  # fmt: skip
    """CPU: per row block of one expert, recompute act from the saved pre-activations, then
    the six GEMMs; weight gradients accumulate in place, x's gradient scatters per block."""
    n_exp, f, d = w_up_EFD.shape
    glu = _present(w_gate_EFD)
    bounds = offsets_E1.tolist()
    lo, hi = bounds[first], bounds[first + n_exp]
    grad_x_TD = _buffers.empty_like(x_TD)  # zeroed below (by its worker when parallel)
    grad_w_up = _buffers.empty_like(w_up_EFD)
    grad_w_gate = _buffers.empty_like(w_gate_EFD) if glu else _empty(x_TD)
    grad_w_down = _buffers.empty_like(w_down_EDF)
    grads_b = [_empty(x_TD) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        grads_b = [x_TD.new_zeros(n_exp, f), x_TD.new_zeros(n_exp, f) if glu else _empty(x_TD),
                   x_TD.new_zeros(n_exp, d)]  # fmt: skip
    experts, sizes = _blocks(bounds, first, n_exp, f, d, x_TD.element_size()) if hi > lo else ([], [])
    for e in set(range(n_exp)) - set(experts):  # an expert without rows: zero weight gradients
        for gw in (grad_w_up, grad_w_gate, grad_w_down) if glu else (grad_w_up, grad_w_down):
            gw[e].zero_()
    if not experts:
        return [grad_x_TD.zero_(), grad_w_up, grad_w_gate, grad_w_down, *grads_b]
    idx_b, g_b = token_idx_N[lo:hi].split(sizes), grad_y_ND[lo:hi].split(sizes)
    up_b = up_NF[lo:hi].split(sizes)
    gate_b = gate_NF[lo:hi].split(sizes) if glu else None
    w_up, w_down = w_up_EFD.unbind(0), w_down_EDF.unbind(0)  # [F, D], [D, F]
    w_gate = w_gate_EFD.unbind(0) if glu else None
    gw_up, gw_down = grad_w_up.unbind(0), grad_w_down.unbind(0)
    gw_gate = grad_w_gate.unbind(0) if glu else None
    seen = [False] * n_exp  # expert e's weight gradients hold a first block already

    def block(i: int, grad_x_TD: Tensor) -> None:
        e = experts[i]
        acc, seen[e] = seen[e], True
        x_BD = x_TD.index_select(0, idx_b[i])
        g_BD, up_BF = g_b[i], up_b[i]
        if gate_b is not None:
            gate_BF = gate_b[i]
            a_BF = act(activation, gate_BF)
            h_BF = torch.mul(a_BF, up_BF)
        else:
            h_BF = act(activation, up_BF)
        _wgrad(g_BD, h_BF, gw_down[e], acc)  # [D, F]
        gh_BF = torch.mm(g_BD, w_down[e])
        if gate_b is not None:
            gu_BF = a_BF.mul_(gh_BF)  # d up = d h * act(gate)
            gg_BF = act_backward_(activation, gh_BF.mul_(up_BF), gate_BF)  # d gate = d h * up * act'
        else:
            gu_BF, gg_BF = act_backward_(activation, gh_BF, up_BF), None
        _wgrad(gu_BF, x_BD, gw_up[e], acc)
        if gg_BF is not None:
            _wgrad(gg_BF, x_BD, gw_gate[e], acc)  # right after the other one reading x_BD
        gx_BD = torch.mm(gu_BF, w_up[e])
        if gg_BF is not None:
            gx_BD.addmm_(gg_BF, w_gate[e])
        grad_x_TD.index_add_(0, idx_b[i], gx_BD)
        if has_bias:
            grads_b[0][e].add_(gu_BF.sum(0))
            if gg_BF is not None:
                grads_b[1][e].add_(gg_BF.sum(0))
            grads_b[2][e].add_(g_BD.sum(0))

    n_par = _n_parallel(len(experts), hi - lo, d, f)
    if n_par == 1:
        grad_x_TD.zero_()
        for i in range(len(experts)):
            block(i, grad_x_TD)
        return [grad_x_TD, grad_w_up, grad_w_gate, grad_w_down, *grads_b]
    # Static runs of whole experts (deterministic sums): each worker scatters x's gradient
    # into its own accumulator (zeroed by that worker), summed in order at the end.
    parts = _split(experts, sizes, n_par)
    accs = [grad_x_TD] + [_buffers.empty_like(x_TD) for _ in parts[1:]]

    def piece(blocks: list[int], acc_TD: Tensor) -> Callable[[], None]:
        def run() -> None:
            acc_TD.zero_()
            for i in blocks:
                block(i, acc_TD)

        return run

    _parallel.run([piece(p, a) for p, a in zip(parts, accs, strict=True)])
    for a in accs[1:]:
        grad_x_TD.add_(a)
    return [grad_x_TD, grad_w_up, grad_w_gate, grad_w_down, *grads_b]


def _wgrad(g_BM: Tensor, x_BK: Tensor, out_MK: Tensor, accumulate: bool) -> None:
    """out (+)= g.T @ x, the transposed operand read as a view (BLAS transpose flag)."""
    if accumulate:
        out_MK.addmm_(g_BM.t(), x_BK)
    else:
        torch.mm(g_BM.t(), x_BK, out=out_MK)


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
    # up/gate are outputs only to be saved: their (unused) gradients stay None instead of
    # being materialised as [N, F] zeros on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_up, _grad_gate):
    if grad_y is None:
        return (None,) * 11
    x, token_idx, offsets, w_up, w_gate, w_down, up, gate = ctx.saved_tensors
    g = torch.ops.moespec.expert_ffn_backward(
        grad_y.contiguous(), x, token_idx, offsets, ctx.first, w_up, w_gate, w_down, up, gate,
        ctx.has_bias, ctx.activation,
    )  # fmt: skip
    gx, gwu, gwg, gwd, gbu, gbg, gbd = g
    opt = lambda t: t if t.numel() > 0 else None  # noqa: E731
    return gx, None, None, None, gwu, opt(gwg), gwd, opt(gbu), opt(gbg), opt(gbd), None


expert_ffn.register_autograd(_backward, setup_context=_setup)
