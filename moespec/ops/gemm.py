"""Grouped GEMMs over expert-sorted rows, for the CPU (and fallback) implementations.

Legend: N routed rows (sorted by expert), D d_model, F expert width, E experts.
``offsets_E1`` holds E+1 row offsets (offsets[0] = 0); rows at or past offsets[E] belong to
no expert (dropped / sentinel) and are left as zeros.

``torch.nn.functional.grouped_mm`` is used where it applies (it needs 16-byte aligned strides
and a supported dtype); otherwise a loop of ``torch.mm`` over the expert slices computes the
same thing. On CPU the loop's ``tolist()`` is not a device sync, and both run at dense-GEMM
speed for realistic shapes (see benchmarks/).
"""

from __future__ import annotations

import torch
from torch import Tensor

_GMM = getattr(torch.nn.functional, "grouped_mm", None)
_GMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(*tensors: Tensor) -> bool:
    # grouped_mm requires every non-unit stride to be a multiple of 16 bytes.
    for t in tensors:
        size = t.element_size()
        if any((s * size) % 16 for s, n in zip(t.stride(), t.shape, strict=False) if n > 1 and s != 1):
            return False
    return True


def _use_gmm(*tensors: Tensor) -> bool:
    return _GMM is not None and all(t.dtype in _GMM_DTYPES for t in tensors) and _aligned(*tensors)


def gmm(x_ND: Tensor, w_EMK: Tensor, offsets_E1: Tensor) -> Tensor:
    """out[n] = x[n] @ w[e(n)].T for the rows of expert e; rows past offsets[E] are zero.

    ``w_EMK`` has shape [E, M, K] (torch.nn.Linear layout), ``x_ND`` has K = D columns.
    """
    n_rows, m = x_ND.shape[0], w_EMK.shape[1]
    w_EKM = w_EMK.transpose(1, 2)
    if _use_gmm(x_ND, w_EKM):
        out = _GMM(x_ND, w_EKM, offs=offsets_E1[1:].to(torch.int32))
        # grouped_mm leaves rows past the last offset uninitialised.
        valid_N = torch.arange(n_rows, device=x_ND.device) < offsets_E1[-1]
        return torch.where(valid_N.unsqueeze(1), out, out.new_zeros(()))
    out = x_ND.new_zeros(n_rows, m)
    bounds = offsets_E1.tolist()
    for e in range(w_EMK.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(x_ND[lo:hi], w_EKM[e], out=out[lo:hi])
    return out


def gmm_wgrad(g_NM: Tensor, x_NK: Tensor, offsets_E1: Tensor, n_experts: int) -> Tensor:
    """grad_w[e] = g_e.T @ x_e over each expert's rows: shape [E, M, K]; empty experts get 0."""
    m, k = g_NM.shape[1], x_NK.shape[1]
    g_MN = g_NM.t().contiguous()
    if _use_gmm(g_MN, x_NK) and offsets_E1.shape[0] == n_experts + 1:
        return _GMM(g_MN, x_NK, offs=offsets_E1[1:].to(torch.int32))
    out = g_NM.new_zeros(n_experts, m, k)
    bounds = offsets_E1.tolist()
    for e in range(n_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(g_MN[:, lo:hi], x_NK[lo:hi], out=out[e])
    return out
