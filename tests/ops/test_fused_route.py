"""moespec::topk_route against the reference router: indices, weights, gradients, opcheck."""

from __future__ import annotations

import itertools

import pytest
import torch

import moespec.ops.route  # noqa: F401  (registers torch.ops.moespec.topk_route)
from moespec.reference.routing import route_topk
from moespec.spec.routers import TopKRouter

CONFIGS = [
    (score, order, renorm, groups, bias)
    for score, order, renorm, groups, bias in itertools.product(
        ["softmax", "sigmoid"],
        ["softmax_then_topk", "topk_then_softmax"],
        [False, True],
        [False, True],
        [False, True],
    )
    if not (score == "sigmoid" and order == "topk_then_softmax")
]


def _op(logits, bias_E, k, score, order, renorm, groups, gumbel=None):
    return torch.ops.moespec.topk_route(
        logits, bias_E, torch.empty(0) if gumbel is None else gumbel, k, score, order, renorm, 1.7,
        4 if groups else 0, 2, "top2_sum",
    )  # fmt: skip


@pytest.mark.parametrize("score,order,renorm,groups,bias", CONFIGS)
@pytest.mark.parametrize("t", [1, 7])
def test_matches_reference_and_gradcheck(t, score, order, renorm, groups, bias):
    g = torch.Generator().manual_seed(t)
    spec = TopKRouter(
        kind="topk", k=3, score=score, order=order, renormalize=renorm, scaling_factor=1.7,
        groups={"n_groups": 4, "topk_groups": 2} if groups else None,
        expert_bias={"update_rate": 0.01} if bias else None,
    )  # fmt: skip
    x = torch.randn(t, 6, generator=g, dtype=torch.float64)
    w = torch.randn(8, 6, generator=g, dtype=torch.float64, requires_grad=True)
    eb = (
        torch.randn(8, generator=g, dtype=torch.float64) * 0.1
        if bias
        else torch.empty(0, dtype=torch.float64)
    )
    ref = route_topk(
        x, w, spec, n_experts=8, training=False, expert_bias_E=eb if bias else None, default_dtype="fp64"
    )
    weight, idx, probs = _op(x @ w.T, eb, 3, score, order, renorm, groups)
    assert torch.equal(idx, ref.topk_idx_TK)
    torch.testing.assert_close(weight, ref.topk_weight_TK)
    torch.testing.assert_close(probs, ref.probs_TE)

    def fn(w):
        weight, _, probs = _op(x @ w.T, eb, 3, score, order, renorm, groups)
        return weight, probs

    assert torch.autograd.gradcheck(fn, (w,))
    # One output alone: the other's gradient is None in the backward (not materialized).
    assert torch.autograd.gradcheck(lambda w: fn(w)[0], (w,))
    assert torch.autograd.gradcheck(lambda w: fn(w)[1], (w,))


def test_sampling_second_expert_matches_reference_draws():
    spec = TopKRouter(kind="topk", k=2, second_expert_policy="sampling")
    x, w = torch.randn(7, 6), torch.randn(8, 6)
    ref = route_topk(x, w, spec, n_experts=8, training=True, generator=torch.Generator().manual_seed(3))
    # The reference draws its Gumbel noise as the first random tensor of the generator.
    from moespec.common.rng import gumbel

    noise = gumbel((7, 8), torch.Generator().manual_seed(3), x)
    _, idx, _ = _op(x @ w.T, torch.empty(0), 2, "softmax", "softmax_then_topk", False, False, gumbel=noise)
    assert torch.equal(idx, ref.topk_idx_TK)
    assert torch.all(idx[:, 0] != idx[:, 1])


def test_nan_logits_do_not_crash():
    logits = torch.randn(5, 8)
    logits[2] = float("nan")
    weight, idx, _ = _op(logits, torch.empty(0), 2, "softmax", "softmax_then_topk", True, False)
    assert idx.min() >= 0 and idx.max() < 8 and torch.isnan(weight[2]).all()


@pytest.mark.parametrize(
    "args",
    [
        (2, "softmax", "softmax_then_topk", True, 1.0, 0, 0, "max", False, False),
        (2, "softmax", "softmax_then_topk", True, 2.5, 4, 2, "top2_sum", True, True),
        (3, "sigmoid", "softmax_then_topk", False, 1.0, 0, 0, "max", False, False),
        (2, "softmax", "topk_then_softmax", False, 1.0, 0, 0, "max", True, False),
    ],
)
def test_opcheck(args):
    k, score, order, renorm, scale, ng, tg, gs, bias, gumbel = args
    bias_E = torch.randn(8) if bias else torch.empty(0)
    gumbel_TE = torch.randn(7, 8) if gumbel else torch.empty(0)
    a = (torch.randn(7, 8, requires_grad=True), bias_E, gumbel_TE, k, score, order, renorm, scale, ng, tg, gs)
    result = torch.library.opcheck(torch.ops.moespec.topk_route.default, a)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7, 8])
def test_topk_fast_path_matches_stable_sort(ties, k):
    """The CPU top-k shortcut selects and orders exactly like the stable sort, ties included."""
    from moespec.common.select import stable_topk
    from moespec.ops.route import _topk_idx

    g = torch.Generator().manual_seed(k)
    crit = torch.randn(64, 8, generator=g)
    if ties:  # coarse values: many equal entries, some rows with -inf, -0.0 and +0.0, NaN
        crit = (crit * 2).round() / 2
        crit[3, :4] = float("-inf")
        crit[5, 1], crit[5, 6] = -0.0, 0.0
        crit[7, 2] = float("nan")
    assert torch.equal(_topk_idx(crit, k), stable_topk(crit, k))
