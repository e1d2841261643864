"""The fused Triton router (``torch.ops.moespec.triton_topk_route``) against the plain-PyTorch
reference selection (``moespec.common.select``, softmax/sigmoid by hand): weights, indices,
probabilities and the logits' gradient, for softmax and sigmoid scores, both orders,
renormalisation, an expert bias, group-limited selection (max and top-2-sum group scores),
ties, odd expert counts and T in {1, 7, 64}. Run under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import pytest
import torch

import moespec.ops.route  # noqa: F401  (registers the ops)
from moespec.common.select import group_limited_mask, mask_unselected, stable_topk
from moespec.ops import _expert_triton

OPS = torch.ops.moespec


def _reference(logits, bias, k, score, order, renorm, scale, n_groups, topk_groups, group_score):
    """The routing of moespec's reference router, written out."""
    probs = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    crit = logits if order == "topk_then_softmax" else probs
    if bias is not None:
        crit = crit + bias
    if n_groups:
        crit = mask_unselected(crit, group_limited_mask(crit, n_groups, topk_groups, group_score))
    idx = stable_topk(crit, k)
    if order == "topk_then_softmax":
        w = logits.gather(1, idx).softmax(-1)
    else:
        w = probs.gather(1, idx)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
    return w * scale, idx, probs


CASES = [
    # T, E, K, score, order, renorm, scale, bias, n_groups, topk_groups, group_score
    (7, 8, 2, "softmax", "softmax_then_topk", True, 1.0, False, 0, 0, "max"),
    (1, 5, 1, "softmax", "softmax_then_topk", False, 1.0, False, 0, 0, "max"),
    (64, 12, 3, "softmax", "topk_then_softmax", False, 1.0, False, 0, 0, "max"),
    (7, 16, 4, "sigmoid", "softmax_then_topk", True, 2.5, True, 4, 2, "top2_sum"),  # DeepSeek-V3-like
    (64, 24, 6, "softmax", "softmax_then_topk", False, 1.0, False, 8, 3, "max"),  # DeepSeek-V2-like
    (7, 6, 2, "sigmoid", "softmax_then_topk", False, 1.0, True, 0, 0, "max"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-{c[4]}-g{c[8]}")
def test_router_equals_reference(case):
    t, e, k, score, order, renorm, scale, has_bias, n_groups, topk_groups, group_score = case
    g = torch.Generator().manual_seed(t * e + k)
    logits = torch.randn(t, e, generator=g)
    logits[0, :3] = 0.5  # ties in a row
    bias = torch.randn(e, generator=g) * 0.1 if has_bias else None
    args = (k, score, order, renorm, scale, n_groups, topk_groups, group_score)
    l1, l2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    before = _expert_triton.LAUNCHES["topk_route"]
    w1, i1, p1 = OPS.triton_topk_route(l1, bias if has_bias else torch.empty(0), torch.empty(0), *args)
    assert _expert_triton.LAUNCHES["topk_route"] == before + 1
    w2, i2, p2 = _reference(l2, bias, *args)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)
    gw, gp = torch.randn_like(w1), torch.randn_like(p1)
    ((w1 * gw).sum() + (p1 * gp).sum()).backward()
    ((w2 * gw).sum() + (p2 * gp).sum()).backward()
    torch.testing.assert_close(l1.grad, l2.grad, atol=1e-6, rtol=1e-5)


def test_sampling_is_refused():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match="no second-expert sampling"):
        OPS.triton_topk_route(logits, torch.empty(0), torch.rand(3, 4), 2, "softmax", "softmax_then_topk",
                              False, 1.0, 0, 0, "max")  # fmt: skip


@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_nan_and_all_minus_inf_rows_pick_distinct_valid_experts(order):
    """Rows torch's top-k orders by its NaN rule (NaN first) and rows with nothing finite: the
    kernel picks what the reference picks, distinct experts, never an index past E."""
    logits = torch.randn(3, 8)
    logits[0, 5] = float("nan")
    logits[1] = float("-inf")
    args = (2, "softmax", order, False, 1.0, 0, 0, "max")
    _, idx, _ = OPS.triton_topk_route(logits, torch.empty(0), torch.empty(0), *args)
    _, want, _ = _reference(logits, None, *args)
    assert torch.equal(idx, want), (idx, want)
    assert int(idx.max()) < 8 and all(len(set(r)) == 2 for r in idx.tolist())
