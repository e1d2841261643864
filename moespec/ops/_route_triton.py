"""The forward of ``moespec::triton_topk_route`` (``target.backend: triton``): the fused
top-k router kernel (``templates/triton/topk_route.py.jinja``).

Legend: T tokens, E experts, K selections per token. Same results as ``moespec::topk_route``
without second-expert sampling (GShard's, whose lowering keeps the torch op); the backward is
``topk_route``'s analytic one (torch ops on [T, E] tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.codegen.load import interpreting, kernel_set, require_triton
from moespec.codegen.render import RouterSpecialisation
from moespec.ops._expert_triton import LAUNCHES


def forward(logits_TE: Tensor, expert_bias_E: Tensor, k: int, score: str, order: str, renormalize: bool,
            scale: float, n_groups: int, topk_groups: int,
            group_score: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(weight_TK, idx_TK, probs_TE)`` as ``moespec.ops.route.topk_route`` returns them."""
    require_triton(logits_TE.device.type)
    ks = kernel_set(RouterSpecialisation(score, order, renormalize, group_score))
    t, e = logits_TE.shape
    logits_TE = logits_TE.contiguous()
    weight_TK = logits_TE.new_empty(t, k)
    idx_TK = torch.empty(t, k, dtype=torch.int64, device=logits_TE.device)
    probs_TE = torch.empty_like(logits_TE)
    block_e = triton_next_pow2(e)
    # Enough tokens per program to fill the warps, few enough to keep [BLOCK_T, E] in registers.
    block_t = 4 if interpreting() else max(1, min(64, 4096 // block_e))
    if t:
        LAUNCHES["topk_route"] += 1
        ks.topk_route[(-(-t // block_t),)](
            logits_TE, expert_bias_E, weight_TK, idx_TK, probs_TE, t, e, float(scale),
            K=k, HAS_BIAS=expert_bias_E.numel() > 0, N_GROUPS=n_groups, TOPK_GROUPS=topk_groups,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton_next_pow2(k),
            BLOCK_G=triton_next_pow2(max(n_groups, 1)),
        )  # fmt: skip
    return weight_TK, idx_TK, probs_TE


def triton_next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton's block shapes are powers of two."""
    return 1 << max(0, (n - 1).bit_length())
