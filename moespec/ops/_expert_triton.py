"""The expert ops' kernels for ``target.backend: triton``: generated Triton kernels
(``templates/triton/``, rendered and loaded by ``moespec.codegen``).

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows (sorted by
expert, ``offsets_E1`` global over the layer), J column tiles of F.

Same interface and results as ``_expert_cpu`` / ``_expert_grouped`` (``forward`` and
``backward``). Forward: ``expert_up`` (x rows gathered in the load, activation in the
epilogue) then ``expert_rows_gemm`` (h W_down^T, bias and routing weight in the epilogue),
then with the combine ``combine`` (token order, fixed summation order: deterministic).
Backward: ``expert_down_backward`` (output gradient gathered, activation derivative and the
routing weight's gradient partials in the epilogue), ``expert_rows_gemm`` for the input
rows' gradient (``combine`` into tokens), ``expert_wgrad`` for the weights and
``segment_sum`` for the biases (the weight gradients read packed rows: x and the weighted
output gradient gathered once per call, which the kernel streams faster than it gathers). No fp32
atomics anywhere; the routing bookkeeping around the kernels (tile schedule, token order) is
a few torch ops with no host sync.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.codegen import tuning
from moespec.codegen.load import interpreting, kernel_set, require_triton
from moespec.codegen.render import Specialisation
from moespec.ops._expert_weights import ExpertGrads, ExpertWeights

# Kernel launches by name: tests read it to prove the Triton kernels ran (no fallback).
LAUNCHES: Counter[str] = Counter()

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dense(*tensors: Tensor | None) -> tuple:
    """The tensors made contiguous (None stays None): the kernels index rows as base + row *
    width, so a strided view (a column slice, a transposed copy) would be read wrong."""
    return tuple(t if t is None else t.contiguous() for t in tensors)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _specialisation(x_TD: Tensor, w: ExpertWeights, has_bias: bool, activation: str) -> Specialisation:
    require_triton(x_TD.device.type)
    if x_TD.dtype not in _DTYPES:
        raise TypeError(f"the triton backend runs fp32, bf16 and fp16, not {x_TD.dtype}")
    for name, t in zip(ExpertWeights._fields, w, strict=True):
        if t.numel() and t.dtype != x_TD.dtype:
            raise TypeError(f"expert weight {name} is {t.dtype} but the activations are {x_TD.dtype}")
    return Specialisation.of(activation, w.glu, has_bias, _DTYPES[x_TD.dtype])


@functools.cache
def _arch(index: int | None) -> str:
    return tuning.arch_of(torch.cuda.get_device_capability(index))


class _Tiles:
    """The tuning table's tile per kernel role for one call, and the row-tile schedule of each
    row block size in use (built once per size)."""

    def __init__(self, x_TD: Tensor, offs_E1: Tensor, n_rows: int) -> None:
        arch = "interpret" if interpreting() else _arch(x_TD.device.index)
        self._key = (arch, x_TD.element_size() * 8, n_rows, offs_E1.shape[0] - 1)
        self._offs, self._n_rows = offs_E1, n_rows
        self._scheds: dict[int, _Schedule] = {}

    def __getitem__(self, role: str) -> tuning.Blocks:
        return tuning.blocks(*self._key, role=role)

    def sched(self, b: tuning.Blocks) -> _Schedule:
        if b.m not in self._scheds:
            self._scheds[b.m] = _Schedule.of(self._offs, self._n_rows, b.m)
        return self._scheds[b.m]


@dataclass(frozen=True)
class _Schedule:
    """Row tiles of one expert group: tile m covers rows [tile_row[m], +block) of expert
    tile_e[m] (clipped at the expert's end); tile_e = -1 past the last tile. The grid has a
    static upper bound of tiles (cdiv(N, block) + E), so nothing is read back to the host."""

    tile_e: Tensor
    tile_row: Tensor
    n_tiles: int

    @staticmethod
    def of(offs_E1: Tensor, n_rows: int, block: int) -> _Schedule:
        n_exp = offs_E1.shape[0] - 1
        tiles_E = (offs_E1[1:] - offs_E1[:-1] + block - 1) // block
        cum_E = tiles_E.cumsum(0)
        n_tiles = _cdiv(n_rows, block) + n_exp
        m = torch.arange(n_tiles, device=offs_E1.device)
        e = torch.bucketize(m, cum_E, right=True)
        e_c = e.clamp(max=n_exp - 1)
        row = offs_E1[e_c] + (m - (cum_E - tiles_E)[e_c]) * block
        return _Schedule(torch.where(e < n_exp, e_c, -1), row, n_tiles)


@dataclass(frozen=True)
class _TokenOrder:
    """The group's rows listed token by token (a stable sort: each token's rows in row order),
    for the deterministic ``combine``."""

    order_N: Tensor
    tok_offsets_T1: Tensor

    @staticmethod
    def of(token_idx_N: Tensor, offs_E1: Tensor, n_tokens: int) -> _TokenOrder:
        dev = token_idx_N.device
        ar = torch.arange(token_idx_N.shape[0], device=dev)
        valid = (ar >= offs_E1[0]) & (ar < offs_E1[-1])
        key_N = torch.where(valid, token_idx_N, n_tokens)
        sorted_N, order = torch.sort(key_N, stable=True)
        # Token t's rows start where the sorted keys reach t: a search, not a bincount (which
        # reads the largest key back to the host on CUDA and stalls the launch queue).
        tok_offsets = torch.searchsorted(sorted_N, torch.arange(n_tokens + 1, device=dev))
        return _TokenOrder(order, tok_offsets)


def _combine(ks, rows_ND: Tensor, order: _TokenOrder, out_TD: Tensor) -> Tensor:
    n_tok, d = out_TD.shape
    block_d = 128 if not interpreting() else 32
    if n_tok:
        LAUNCHES["combine"] += 1
        ks.combine[(n_tok, _cdiv(d, block_d))](rows_ND, order.order_N, order.tok_offsets_T1, out_TD, d,
                                               BLOCK_D=block_d)  # fmt: skip
    return out_TD


def _rows_gemm(ks, tiles: _Tiles, offs: Tensor, a: Tensor, w: Tensor, out: Tensor, *,
               transposed: bool, a2: Tensor | None = None, w2: Tensor | None = None,
               bias: Tensor | None = None, scale: Tensor | None = None) -> None:  # fmt: skip
    """out[n] = a[n] W[e] (+ a2[n] W2[e]) (+ bias[e]) (* scale[n]) over the group's rows, with
    W[e] = w[e]^T when ``transposed`` (w is [E, M, K]) else w[e] (w is [E, K, M])."""
    b = tiles["rows"]
    sched = tiles.sched(b)
    s1, s2 = w.shape[1:]
    k, m = (s2, s1) if transposed else (s1, s2)
    s_wk, s_wm = (1, s2) if transposed else (s2, 1)
    n_tiles_m = _cdiv(m, b.n)
    dummy = a.new_empty(0)
    LAUNCHES["expert_rows_gemm"] += 1
    ks.expert_rows_gemm[(sched.n_tiles * n_tiles_m,)](
        a, w, dummy if a2 is None else a2, dummy if w2 is None else w2, dummy if bias is None else bias,
        dummy if scale is None else scale, out, sched.tile_e, sched.tile_row, offs,
        k, m, sched.n_tiles, n_tiles_m, s1 * s2, s_wk, s_wm,
        HAS_PAIR2=a2 is not None, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
        BLOCK_M=b.m, BLOCK_N=b.n, BLOCK_K=b.k, num_warps=b.warps, num_stages=b.stages,
    )  # fmt: skip


def _wgrad(ks, tiles: _Tiles, offs: Tensor, a: Tensor, bmat: Tensor) -> Tensor:
    """out[e] = sum over expert e's rows n of a[n]^T b[n]: [E, M, K]."""
    b = tiles["wgrad"]
    n_exp, m, k = offs.shape[0] - 1, a.shape[1], bmat.shape[1]
    out = a.new_empty(n_exp, m, k)
    n_tiles_m, n_tiles_k = _cdiv(m, b.m), _cdiv(k, b.n)
    LAUNCHES["expert_wgrad"] += 1
    ks.expert_wgrad[(n_tiles_m * n_tiles_k, n_exp)](
        a, bmat, out, offs, m, k, n_tiles_m, n_tiles_k,
        BLOCK_M=b.m, BLOCK_K=b.n, BLOCK_N=b.k, num_warps=b.warps, num_stages=b.stages,
    )  # fmt: skip
    return out


def _segment_sum(ks, offs: Tensor, a: Tensor, token_idx_N: Tensor, *, gather: bool,
                 scale: Tensor | None = None) -> Tensor:  # fmt: skip
    """out[e] = sum over expert e's rows n of scale[n] a[row or token of n]: [E, C]."""
    n_exp, c = offs.shape[0] - 1, a.shape[1]
    out = a.new_empty(n_exp, c)
    block_c = 32 if interpreting() else 128
    LAUNCHES["segment_sum"] += 1
    ks.segment_sum[(_cdiv(c, block_c), n_exp)](
        a, token_idx_N, a.new_empty(0) if scale is None else scale, out, offs, c,
        GATHER=gather, HAS_SCALE=scale is not None, BLOCK_N=16, BLOCK_C=block_c,
    )  # fmt: skip
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
    """Same results as ``_expert_cpu.forward`` (up to the summation order of the GEMMs)."""
    x_TD, token_idx_N, weight_N = _dense(x_TD, token_idx_N, weight_N)
    w = ExpertWeights(*_dense(*w))
    ks = kernel_set(_specialisation(x_TD, w, w.has_bias, activation))
    (n_exp, f, d), n_rows, glu = w.w_up_EFD.shape, token_idx_N.shape[0], w.glu
    offs = offsets_E1[first : first + n_exp + 1]
    tiles = _Tiles(x_TD, offs, n_rows)
    b = tiles["up"]
    sched = tiles.sched(b)
    up_NF = x_TD.new_zeros(n_rows, f)
    gate_NF = x_TD.new_zeros(n_rows, f) if glu else x_TD.new_empty(0)
    h_NF = x_TD.new_empty(n_rows, f)
    n_tiles_f = _cdiv(f, b.n)
    if n_rows:
        LAUNCHES["expert_up"] += 1
        ks.expert_up[(sched.n_tiles * n_tiles_f,)](
            x_TD, token_idx_N, w.w_up_EFD, w.w_gate_EFD, w.b_up_EF, w.b_gate_EF, up_NF, gate_NF, h_NF,
            sched.tile_e, sched.tile_row, offs, d, f, sched.n_tiles, n_tiles_f,
            BLOCK_M=b.m, BLOCK_F=b.n, BLOCK_K=b.k, num_warps=b.warps, num_stages=b.stages,
        )  # fmt: skip
    bias = w.b_down_ED if w.has_bias else None
    if weight_N is None:
        y_ND = x_TD.new_zeros(n_rows, d)
        if n_rows:
            _rows_gemm(ks, tiles, offs, h_NF, w.w_down_EDF, y_ND, transposed=True, bias=bias)
        return y_ND, up_NF, gate_NF
    rows_ND = x_TD.new_empty(n_rows, d)
    if n_rows:
        _rows_gemm(ks, tiles, offs, h_NF, w.w_down_EDF, rows_ND, transposed=True, bias=bias, scale=weight_N)
    order = _TokenOrder.of(token_idx_N, offs, x_TD.shape[0])
    return _combine(ks, rows_ND, order, x_TD.new_empty(x_TD.shape)), up_NF, gate_NF


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
    """Same results as ``_expert_cpu.backward`` (up to the summation order of the GEMMs)."""
    grad_y, x_TD, token_idx_N, up_NF, gate_NF, weight_N = _dense(
        grad_y, x_TD, token_idx_N, up_NF, gate_NF, weight_N
    )
    w = ExpertWeights(*_dense(*w))
    ks = kernel_set(_specialisation(x_TD, w, has_bias, activation))
    (n_exp, f, d), n_rows, glu, combine = w.w_up_EFD.shape, token_idx_N.shape[0], w.glu, weight_N is not None
    offs = offsets_E1[first : first + n_exp + 1]
    tiles = _Tiles(x_TD, offs, n_rows)
    b = tiles["down_bwd"]
    sched = tiles.sched(b)
    n_tiles_f = _cdiv(f, b.n)
    d_up_NF = x_TD.new_empty(n_rows, f)
    d_gate_NF = x_TD.new_empty(n_rows, f) if glu else x_TD.new_empty(0)
    h_NF = x_TD.new_empty(n_rows, f)
    partial_NJ = torch.zeros(n_rows, n_tiles_f if combine else 0, dtype=torch.float32, device=x_TD.device)
    wt_N = x_TD.new_empty(0) if weight_N is None else weight_N
    if n_rows:
        LAUNCHES["expert_down_backward"] += 1
        ks.expert_down_backward[(sched.n_tiles * n_tiles_f,)](
            grad_y, token_idx_N, w.w_down_EDF, up_NF, gate_NF, wt_N,
            d_up_NF, d_gate_NF, h_NF, partial_NJ, sched.tile_e, sched.tile_row, offs, d, f, sched.n_tiles,
            n_tiles_f,
            COMBINE=combine, BLOCK_M=b.m, BLOCK_F=b.n, BLOCK_K=b.k, num_warps=b.warps, num_stages=b.stages,
        )  # fmt: skip
    # Input rows' gradient: d_up W_up (+ d_gate W_gate), then summed per token.
    gx_ND = x_TD.new_zeros(n_rows, d)
    if n_rows:
        _rows_gemm(ks, tiles, offs, d_up_NF, w.w_up_EFD, gx_ND, transposed=False,
                   a2=d_gate_NF if glu else None, w2=w.w_gate_EFD if glu else None)  # fmt: skip
    order = _TokenOrder.of(token_idx_N, offs, x_TD.shape[0])
    grad_x_TD = _combine(ks, gx_ND, order, x_TD.new_empty(x_TD.shape))
    # Weights: W_down from the weighted output gradient and h; W_up/W_gate from d_up/d_gate
    # and x. Their row operands are packed first (gathered rows, the routing weight applied):
    # the weight-gradient kernel streams contiguous rows faster than it gathers them (H200,
    # Mixtral's shape: 7.6 -> 5.6 ms for the three, for two [N, D] copies per expert-group
    # call; the copies cover all N rows, the kernel reads only the group's).
    tok_N = token_idx_N.clamp(0, max(x_TD.shape[0] - 1, 0))  # rows outside the group: any token
    x_ND = x_TD.index_select(0, tok_N)
    g_ND = grad_y.index_select(0, tok_N).mul_(weight_N.to(grad_y.dtype)[:, None]) if combine else grad_y
    grad_w_down = _wgrad(ks, tiles, offs, g_ND, h_NF)
    grad_w_up = _wgrad(ks, tiles, offs, d_up_NF, x_ND)
    grad_w_gate = _wgrad(ks, tiles, offs, d_gate_NF, x_ND) if glu else x_TD.new_empty(0)
    grads_b = [x_TD.new_empty(0) for _ in range(3)]  # distinct: outputs must not alias
    if has_bias:
        grads_b = [
            _segment_sum(ks, offs, d_up_NF, token_idx_N, gather=False),
            _segment_sum(ks, offs, d_gate_NF, token_idx_N, gather=False) if glu else x_TD.new_empty(0),
            _segment_sum(ks, offs, grad_y, token_idx_N, gather=combine, scale=weight_N),
        ]
    grad_w = ExpertWeights(grad_w_up, grad_w_gate, grad_w_down, *grads_b)
    grad_weight_N = None
    if combine:
        grad_weight_N = partial_NJ.sum(1)
        if has_bias:
            grad_weight_N += _bias_term(grad_y, token_idx_N, offs, w.b_down_ED)
        grad_weight_N = grad_weight_N.to(weight_N.dtype)
    return ExpertGrads(grad_x_TD, grad_w, grad_weight_N)


def _bias_term(grad_y_TD: Tensor, token_idx_N: Tensor, offs_E1: Tensor, b_down_ED: Tensor) -> Tensor:
    """<g[token of n], b_down[e(n)]> for the group's rows (0 elsewhere): the bias's part of
    dL/dweight[n]."""
    n_exp = offs_E1.shape[0] - 1
    ar = torch.arange(token_idx_N.shape[0], device=token_idx_N.device)
    valid = (ar >= offs_E1[0]) & (ar < offs_E1[-1])
    e_N = torch.bucketize(ar, offs_E1[1:], right=True).clamp_(max=n_exp - 1)
    g_ND = grad_y_TD.index_select(0, torch.where(valid, token_idx_N, 0))
    dots = torch.linalg.vecdot(g_ND.float(), b_down_ED[e_N].float())
    return torch.where(valid, dots, 0.0)
