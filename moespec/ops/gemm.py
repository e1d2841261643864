"""Grouped GEMMs over expert-sorted rows, for the CPU (and fallback) implementations.

Legend: N routed rows (sorted by expert), D d_model, F expert width, E experts.
``offsets_E1`` holds E+1 row offsets (offsets[0] = 0); rows at or past offsets[E] belong to
no expert (dropped / sentinel) and are left as zeros.

Off the CPU, ``torch.nn.functional.grouped_mm`` is used where it applies (it needs 16-byte
aligned strides and a supported dtype). On the CPU ATen's grouped_mm is itself a loop of
``torch.mm`` over the groups into a fresh output, so the loop here is used instead: it writes
each expert's slice straight into ``out`` (no copy, no masking pass) and reads transposed
operands as views (no ``.contiguous()`` copies; BLAS takes the transpose flags). On the CPU
the loop's ``tolist()`` is not a device sync. :func:`expert_blocks` is the row tiling of the
blocked CPU expert kernels in ``moespec.ops._expert_cpu``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

_GMM = getattr(torch.nn.functional, "grouped_mm", None)
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(*tensors: Tensor) -> bool:
    """grouped_mm's operand check (ATen ``check_valid_strides_and_return_transposed``): a
    16-byte aligned data pointer, row- or column-major last two dims, and the leading stride
    of those a multiple of 16 bytes. Checked on every dim, size-1 ones included, as ATen does."""
    for t in tensors:
        st, sz = t.stride(), t.shape
        align = max(1, 16 // t.element_size())
        if t.data_ptr() % 16:
            return False
        if st[-2] == 1 and st[-1] >= max(1, sz[-2]):
            lead = st[-1]
        elif st[-1] == 1 and st[-2] >= max(1, sz[-1]):
            lead = st[-2]
        else:
            return False
        if lead % align:
            return False
    return True


# Tests set this to run torch's grouped_mm on the CPU too (its CPU kernel is a loop of mm).
_GMM_ON_CPU = False


def _use_gmm(*tensors: Tensor) -> bool:
    return (
        _GMM is not None
        and (tensors[0].device.type != "cpu" or _GMM_ON_CPU)
        and all(t.dtype in _GMM_DTYPES for t in tensors)
        and _aligned(*tensors)
    )


def gmm(
    x_ND: Tensor, w_EMK: Tensor, offsets_E1: Tensor, *, out: Tensor | None = None, n_valid: int | None = None
) -> Tensor:
    """out[n] = x[n] @ w[e(n)].T for the rows of expert e; rows past offsets[E] are zero.

    ``w_EMK`` has shape [E, M, K] (torch.nn.Linear layout), ``x_ND`` has K = D columns.
    ``out`` ([N, M]) receives the result when given; ``n_valid`` = offsets[E] when the caller
    knows it (``n_valid == N`` skips zeroing the tail).
    """
    n_rows, m = x_ND.shape[0], w_EMK.shape[1]
    w_EKM = w_EMK.transpose(1, 2)
    if _use_gmm(x_ND, w_EKM):
        res = _GMM(x_ND, w_EKM, offs=offsets_E1[1:].to(torch.int32))
        # grouped_mm leaves rows past the last offset uninitialised.
        if n_valid is None:
            valid_N = torch.arange(n_rows, device=x_ND.device) < offsets_E1[-1]
            res = torch.where(valid_N.unsqueeze(1), res, res.new_zeros(()))
        elif n_valid < n_rows:
            res[n_valid:].zero_()
        return res if out is None else out.copy_(res)
    bounds = offsets_E1.tolist()
    if out is None:
        out = x_ND.new_empty(n_rows, m)
    out[bounds[-1] :].zero_()
    for e in range(w_EMK.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x_ND[lo:hi], w_EKM[e], out=out[lo:hi])
    return out


def gmm_wgrad(g_NM: Tensor, x_NK: Tensor, offsets_E1: Tensor, n_experts: int) -> Tensor:
    """grad_w[e] = g_e.T @ x_e over each expert's rows: shape [E, M, K]; empty experts get 0."""
    m, k = g_NM.shape[1], x_NK.shape[1]
    if offsets_E1.shape[0] == n_experts + 1 and _use_gmm(x_NK):
        res = _gmm_wgrad_padded(g_NM, x_NK, offsets_E1, n_experts)
        if res is not None:
            return res
    out = g_NM.new_empty(n_experts, m, k)
    bounds = offsets_E1.tolist()
    for e in range(n_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(g_NM[lo:hi].t(), x_NK[lo:hi], out=out[e])
        else:
            out[e].zero_()
    return out


def _gmm_wgrad_padded(g_NM: Tensor, x_NK: Tensor, offsets_E1: Tensor, n_experts: int) -> Tensor | None:
    """:func:`gmm_wgrad` through ``grouped_mm``, or None where it does not apply.

    Here the reduced dimension is the rows, split by expert, and CUDA's grouped_mm asserts
    (on the device: a dead CUDA context) unless every expert's rows span a multiple of 16
    bytes. The rows are therefore copied into a layout where each expert starts at a
    multiple of ``align`` rows, the gaps zero (they add nothing); the padded offsets are
    computed on the device, so nothing is read back to the host."""
    n, align = g_NM.shape[0], max(1, 16 // g_NM.element_size())
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    padded_E1 = torch.zeros_like(offsets_E1)
    padded_E1[1:] = torch.cumsum((counts_E + align - 1) // align * align, 0)
    p = -(-(n + n_experts * (align - 1)) // align) * align  # static bound of the padded rows
    arange_N = torch.arange(n, device=g_NM.device)
    e_N = torch.bucketize(arange_N, offsets_E1[1:], right=True).clamp_(max=n_experts - 1)
    # Dropped rows (past offsets[E]) go to a spare row p, cut off below.
    dest_N = torch.where(arange_N < offsets_E1[-1], padded_E1[e_N] + arange_N - offsets_E1[e_N], p)
    g_PM = g_NM.new_zeros(p + 1, g_NM.shape[1]).index_copy_(0, dest_N, g_NM)[:p]
    x_PK = x_NK.new_zeros(p + 1, x_NK.shape[1]).index_copy_(0, dest_N, x_NK)[:p]
    g_MP = g_PM.t().contiguous()
    if not _use_gmm(g_MP, x_PK):
        return None
    res = _GMM(g_MP, x_PK, offs=padded_E1[1:].to(torch.int32))
    # Experts without rows must read 0 (pytorch#172439: garbage there on some GPUs).
    return torch.where((counts_E == 0)[:, None, None], 0, res)


def linear_into(a_BK: Tensor, w_KM: Tensor, b_M: Tensor | None, out_BM: Tensor) -> Tensor:
    """out = a @ w (+ b), written into ``out`` (``w`` may be a transposed view: BLAS takes
    the transpose flag)."""
    if b_M is None:
        return torch.mm(a_BK, w_KM, out=out_BM)
    return torch.addmm(b_M, a_BK, w_KM, out=out_BM)


def expert_blocks(
    bounds: list[int], first: int, n_experts: int, max_rows: int
) -> Iterator[tuple[int, int, int]]:
    """``(e, lo, hi)`` row blocks of experts ``first .. first+n_experts-1`` (``e`` local to
    the group; ``bounds`` are the global offsets as ints); an expert with more than
    ``max_rows`` rows is split into consecutive blocks, an expert without rows yields none."""
    for e in range(n_experts):
        lo, hi = bounds[first + e], bounds[first + e + 1]
        for r in range(lo, hi, max_rows):
            yield e, r, min(r + max_rows, hi)
