"""Blocked CPU kernels of the expert ops (``moespec.ops.expert_ffn``), forward and backward.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert), B rows of one block, R rows of the group.

One pass per row block of one expert (an expert's rows split into blocks of at most
``_BLOCK_BYTES`` of [rows, max(F, D)] temporaries): gather the block's x rows, run its GEMMs
straight into the outputs' slices (``torch.mm(out=)``, bias via ``addmm``), apply the
activation in place. The backward recomputes act(gate) per block from the saved
pre-activations, using ATen's fused ``*_backward`` kernels. The [N, *] outputs and
temporaries are recycled buffers (``moespec.ops._buffers``: a fresh tensor of 32 MiB or more
is mmapped by glibc and page-faults on every call).

Rows that sum per token (the combined output with ``weight_N``, x's gradient) are written per
routed row, then reduced by one ``embedding_bag(mode="sum")`` over each token's rows in row
order (:func:`_token_sum`; the routing weights enter as its per-sample weights). That
reduction is parallel, deterministic (a fixed order per token, whichever worker made the
rows) and much faster than adding each block's rows into [T, D] in block order, which had to
be serialized to be deterministic. With ``weight_N`` the backward gathers the block's rows of
the [T, D] output gradient, and computes the weights' gradient from the block's hidden rows,
d w[n] = <h[n], g[t] W_down> + <b_down, g[t]> (= <y[n], g[t]>).

Blocks run on one single-threaded worker per intra-op thread (``moespec.ops._parallel``)
when a group is large and its GEMMs are small; the workers take whole experts one at a time
(an expert's weight gradients accumulate over its blocks in one worker, in order), so the
results do not depend on thread timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moespec.ops import _buffers, _parallel
from moespec.ops import _expert_cpu_small as _small
from moespec.ops._expert_weights import ExpertGrads, ExpertWeights
from moespec.ops.activations import act, act_backward_, glu_act, glu_grad_gate_, glu_grad_up_, glu_up
from moespec.ops.gemm import expert_blocks, linear_into

_BLOCK_BYTES = 4 << 20  # one block's widest temporary, [rows, max(F, D)], at most this
_MIN_BLOCK_ROWS = 256
# Blocks run in parallel once a group's rows x D x F reaches _PARALLEL_MIN_MACS (below it the
# hand-off costs more than it saves), while its blocks are small: rows x D x F per block below
# _PARALLEL_MAX_BLOCK_MACS (larger GEMMs run faster split over the threads by BLAS, e.g.
# Mixtral-like 1024 x 512 x 1024).
_PARALLEL_MIN_MACS = 1 << 24
_PARALLEL_MAX_BLOCK_MACS = 1 << 26
# ... and while its blocks average at least this many rows: GEMMs of fewer rows are bound by
# reading the expert's weights, which BLAS's own threads share better than one worker does
# (Mixtral-like, 64 tokens: 5.0 ms serial vs 6.7 ms on workers, eval forward).
_PARALLEL_MIN_ROWS = 96


@dataclass(frozen=True)
class Group:
    """One expert group's rows: experts ``first .. first+E-1`` own rows [lo, hi) of the N
    sorted rows (``token_idx_N``), cut into blocks (``experts[i]`` is block i's local expert, ``sizes[i]`` its
    row count); ``idx_b`` holds each block's token indices, ``units`` the block indices of each
    expert (:func:`expert_units`)."""

    token_idx_N: Tensor
    lo: int
    hi: int
    experts: list[int]
    sizes: list[int]
    idx_b: tuple[Tensor, ...]
    units: list[list[int]]

    @staticmethod
    def of(token_idx_N: Tensor, bounds: list[int], first: int, n_exp: int, d: int, f: int, elt: int) -> Group:
        """The group of ``bounds`` (the offsets as host ints)."""
        lo, hi = bounds[first], bounds[first + n_exp]
        rows = max(_MIN_BLOCK_ROWS, _BLOCK_BYTES // (max(f, d) * elt))
        blocks = list(expert_blocks(bounds, first, n_exp, rows)) if hi > lo else []
        sizes = [r1 - r0 for _, r0, r1 in blocks]
        idx_b = token_idx_N[lo:hi].split(sizes) if blocks else ()
        experts = [e for e, _, _ in blocks]
        return Group(token_idx_N, lo, hi, experts, sizes, idx_b, expert_units(experts))

    @property
    def n_rows(self) -> int:
        return self.token_idx_N.shape[0]

    def split(self, t_NX: Tensor) -> tuple[Tensor, ...]:
        """Per-block views of a tensor with one row per routed row."""
        return t_NX[self.lo : self.hi].split(self.sizes)

    def workers(self, d: int, f: int) -> int:
        """One worker per intra-op thread when the work is large and the blocks are small
        (at most one per expert: a worker takes whole experts)."""
        macs = (self.hi - self.lo) * d * f
        n_blocks, n_units = len(self.experts), len(self.units)
        few_rows = self.hi - self.lo < _PARALLEL_MIN_ROWS * n_blocks
        if (
            n_units < 2
            or few_rows
            or macs < _PARALLEL_MIN_MACS
            or macs >= _PARALLEL_MAX_BLOCK_MACS * n_blocks
        ):
            return 1
        return min(_parallel.threads(), n_units)


def expert_units(experts: list[int]) -> list[list[int]]:
    """Block indices grouped by expert, in order: the unit of work a worker takes (an expert's
    weight gradients accumulate over its blocks, in order, in one worker)."""
    units: list[list[int]] = []
    for i, e in enumerate(experts):
        if i == 0 or experts[i - 1] != e:
            units.append([])
        units[-1].append(i)
    return units


Block = Callable[[int, Tensor | None], None]


def _run(grp: Group, block: Block, n_par: int, scratch: tuple[int, Tensor] | None) -> None:
    """Call ``block(i, tmp_BX)`` for every block i on ``n_par`` workers, which take whole
    experts one at a time (dynamic: a worker slowed down by other load takes fewer).
    ``tmp_BX`` is a per-worker scratch of [max block rows, cols] like ``scratch = (cols, like)``
    (None without scratch)."""
    todo = iter(grp.units)
    lock = threading.Lock()

    def work() -> None:
        tmp = None
        if scratch is not None:
            cols, like = scratch
            tmp = _buffers.empty((max(grp.sizes, default=0), cols), like.dtype, like.device)
        while True:
            with lock:
                unit = next(todo, None)
            if unit is None:
                return
            for i in unit:
                block(i, tmp)

    _parallel.run([work] * n_par)


def _token_sum(grp: Group, rows_ND: Tensor, n_tokens: int, weight_N: Tensor | None) -> Tensor:
    """[T, D]: out[t] = sum of (weight[n] *) rows[n] over the group's rows n of token t, in
    row order (tokens without rows: 0). One ``embedding_bag`` over the rows grouped by token
    (a stable sort of their token indices): parallel over tokens and deterministic."""
    tok_R = grp.token_idx_N[grp.lo : grp.hi]
    order_R = torch.argsort(tok_R, stable=True)
    counts_T = torch.bincount(tok_R, minlength=n_tokens)
    starts_T = counts_T.cumsum(0).sub_(counts_T)
    w_R = None if weight_N is None else weight_N[grp.lo : grp.hi].to(rows_ND.dtype)[order_R]
    return F.embedding_bag(order_R, rows_ND[grp.lo : grp.hi], starts_T, mode="sum", per_sample_weights=w_R)


class _PerExpert:
    """Expert e's slice of an [E, ...] tensor, made on first use: unbinding all E on every
    call costs a view per expert, most of them unused when few tokens are routed."""

    __slots__ = ("_made", "_t")

    def __init__(self, t: Tensor) -> None:
        self._t, self._made = t, {}

    def __getitem__(self, e: int) -> Tensor:
        view = self._made.get(e)
        if view is None:
            view = self._made[e] = self._t[e]
        return view


def _views(t: Tensor, present: bool) -> _PerExpert | None:
    return _PerExpert(t) if present else None


def _zero_outside(t: Tensor, lo: int, hi: int) -> Tensor:
    t[:lo].zero_()
    t[hi:].zero_()
    return t


def forward(
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w: ExpertWeights,
    activation: str,
    weight_N: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, up_NF, gate_NF)``: y is the expert rows [N, D] (zero outside the group), or with
    ``weight_N`` their weighted sum per token [T, D]."""
    d, (n_exp, f) = x_TD.shape[1], w.w_up_EFD.shape[:2]
    glu, combine = w.glu, weight_N is not None
    bounds = offsets_E1.tolist()
    if _small.takes([bounds[first + e + 1] - bounds[first + e] for e in range(n_exp)]):
        return _small.forward_few(x_TD, token_idx_N, bounds, first, w, activation, weight_N)
    grp = Group.of(token_idx_N, bounds, first, n_exp, d, f, x_TD.element_size())
    new = lambda *shape: _buffers.empty(shape, x_TD.dtype, x_TD.device)  # noqa: E731
    up_NF = _zero_outside(new(grp.n_rows, f), grp.lo, grp.hi)
    gate_NF = _zero_outside(new(grp.n_rows, f), grp.lo, grp.hi) if glu else x_TD.new_empty(0)
    # The expert rows; with weight_N a temporary (only the group's rows are read).
    y_ND = new(grp.n_rows, d) if combine else _zero_outside(new(grp.n_rows, d), grp.lo, grp.hi)
    _forward_blocks(x_TD, grp, w, activation, (up_NF, gate_NF, y_ND))
    if combine:  # the routing weight scales the expert's output row (as transformers' MoE blocks do)
        return _token_sum(grp, y_ND, x_TD.shape[0], weight_N), up_NF, gate_NF
    return y_ND, up_NF, gate_NF


def _forward_blocks(x_TD: Tensor, grp: Group, w: ExpertWeights, activation: str,
                    outs: tuple[Tensor, Tensor, Tensor]) -> None:  # fmt: skip
    """The forward's GEMMs one row block of one expert at a time, into ``outs`` (up, gate, y)."""
    up_NF, gate_NF, y_ND = outs
    glu, bias, d, f = w.glu, w.has_bias, x_TD.shape[1], w.w_up_EFD.shape[1]
    up_b, gate_b, y_b = grp.split(up_NF), grp.split(gate_NF) if glu else None, grp.split(y_ND)
    w_up = _PerExpert(w.w_up_EFD.transpose(1, 2))  # [D, F] per expert
    w_gate = _PerExpert(w.w_gate_EFD.transpose(1, 2)) if glu else None
    w_down = _PerExpert(w.w_down_EDF.transpose(1, 2))  # [F, D]
    b_up, b_gate = _views(w.b_up_EF, bias), _views(w.b_gate_EF, bias and glu)
    b_down = _views(w.b_down_ED, bias)

    def block(i: int, _tmp: Tensor | None) -> None:
        e = grp.experts[i]
        x_BD = x_TD.index_select(0, grp.idx_b[i])
        up_BF = linear_into(x_BD, w_up[e], b_up[e] if b_up else None, up_b[i])
        if gate_b is not None:
            gate_BF = linear_into(x_BD, w_gate[e], b_gate[e] if b_gate else None, gate_b[i])
            h_BF = glu_act(activation, gate_BF).mul_(glu_up(activation, up_BF))
        else:
            h_BF = act(activation, up_BF)
        linear_into(h_BF, w_down[e], b_down[e] if b_down else None, y_b[i])

    _run(grp, block, grp.workers(d, f), None)


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
    """Gradients of :func:`forward` (empty tensors for absent weights; weight_N's only with
    ``weight_N``). ``grad_y`` is [N, D], or [T, D] with ``weight_N``; of the biases only
    ``w.b_down_ED`` is read, and only then, with bias (``has_bias``)."""
    n_exp, f, d = w.w_up_EFD.shape
    glu, combine = w.glu, weight_N is not None
    grp = Group.of(token_idx_N, offsets_E1.tolist(), first, n_exp, d, f, x_TD.element_size())
    grad_x_ND = _buffers.empty((grp.n_rows, d), x_TD.dtype, x_TD.device)  # the group's rows, summed per token
    grad_w_up = _buffers.empty_like(w.w_up_EFD)
    grad_w_gate = _buffers.empty_like(w.w_gate_EFD) if glu else x_TD.new_empty(0)
    grad_w_down = _buffers.empty_like(w.w_down_EDF)
    grads_b = [x_TD.new_empty(0) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        grads_b = [x_TD.new_zeros(n_exp, f), x_TD.new_zeros(n_exp, f) if glu else x_TD.new_empty(0),
                   x_TD.new_zeros(n_exp, d)]  # fmt: skip
    grad_w_N = x_TD.new_zeros(grp.n_rows) if combine else None  # rows outside the group: 0
    for e in set(range(n_exp)) - set(grp.experts):  # an expert without rows: zero weight gradients
        for gw in (grad_w_up, grad_w_gate, grad_w_down) if glu else (grad_w_up, grad_w_down):
            gw[e].zero_()
    idx_b, up_b, gx_b = grp.idx_b, grp.split(up_NF), grp.split(grad_x_ND)
    gate_b = grp.split(gate_NF) if glu else None
    g_b = None if combine else grp.split(grad_y)
    w_b = grp.split(weight_N.to(x_TD.dtype).unsqueeze(1)) if combine else None
    grad_w_b = grp.split(grad_w_N) if combine else None
    w_up, w_down = _PerExpert(w.w_up_EFD), _PerExpert(w.w_down_EDF)  # [F, D], [D, F]
    w_gate = _views(w.w_gate_EFD, glu)
    b_down = _views(w.b_down_ED, combine and has_bias)
    gw_up, gw_down = _PerExpert(grad_w_up), _PerExpert(grad_w_down)
    gw_gate = _views(grad_w_gate, glu)
    seen = [False] * n_exp  # expert e's weight gradients hold a first block already

    def block(i: int, tmp_BD: Tensor | None) -> None:
        e = grp.experts[i]
        acc, seen[e] = seen[e], True
        x_BD = x_TD.index_select(0, idx_b[i])
        up_BF = up_b[i]
        if gate_b is not None:
            gate_BF = gate_b[i]
            a_BF, u_BF = glu_act(activation, gate_BF), glu_up(activation, up_BF)
            h_BF = torch.mul(a_BF, u_BF)
        else:
            h_BF = act(activation, up_BF)
        if combine:
            g_BD = torch.index_select(grad_y, 0, idx_b[i], out=tmp_BD[: grp.sizes[i]])  # unweighted
            gh_BF = torch.mm(g_BD, w_down[e])
            # d w[n] = <y[n], g[n]> = <h[n], g[n] W_down> (+ <b_down, g[n]>); then the rows'
            # gradient is w[n] g[n]: scaling h (F wide) gives W_down's gradient g^T (w h).
            torch.linalg.vecdot(h_BF, gh_BF, out=grad_w_b[i])
            if b_down is not None:
                grad_w_b[i].add_(torch.mv(g_BD, b_down[e]))
                grads_b[2][e].add_(torch.mv(g_BD.t(), w_b[i][:, 0]))
            h_BF.mul_(w_b[i])
            gh_BF.mul_(w_b[i])
        else:
            g_BD = g_b[i]
            gh_BF = torch.mm(g_BD, w_down[e])
            if has_bias:
                grads_b[2][e].add_(g_BD.sum(0))
        _wgrad(g_BD, h_BF, gw_down[e], acc)  # [D, F]
        if gate_b is not None:
            gu_BF = glu_grad_up_(activation, a_BF.mul_(gh_BF), up_BF)  # d up = d h * act(gate)
            gg_BF = glu_grad_gate_(activation, gh_BF.mul_(u_BF), gate_BF)  # d gate = d h * up * act'
        else:
            gu_BF, gg_BF = act_backward_(activation, gh_BF, up_BF), None
        _wgrad(gu_BF, x_BD, gw_up[e], acc)
        if gg_BF is not None:
            _wgrad(gg_BF, x_BD, gw_gate[e], acc)  # right after the other one reading x_BD
        gx_BD = torch.mm(gu_BF, w_up[e], out=gx_b[i])
        if gg_BF is not None:
            gx_BD.addmm_(gg_BF, w_gate[e])
        if has_bias:
            grads_b[0][e].add_(gu_BF.sum(0))
            if gg_BF is not None:
                grads_b[1][e].add_(gg_BF.sum(0))

    _run(grp, block, grp.workers(d, f), (d, x_TD) if combine else None)
    return ExpertGrads(
        _token_sum(grp, grad_x_ND, x_TD.shape[0], None),
        ExpertWeights(grad_w_up, grad_w_gate, grad_w_down, *grads_b),
        grad_w_N.to(weight_N.dtype) if combine else None,
    )


def _wgrad(g_BM: Tensor, x_BK: Tensor, out_MK: Tensor, accumulate: bool) -> None:
    """out (+)= g.T @ x, the transposed operand read as a view (BLAS transpose flag)."""
    if accumulate:
        out_MK.addmm_(g_BM.t(), x_BK)
    else:
        torch.mm(g_BM.t(), x_BK, out=out_MK)
