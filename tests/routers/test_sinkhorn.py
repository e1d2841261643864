"""`kind: sinkhorn` (S-BASE, Clark et al. 2022; Megatron-LM's Sinkhorn routing): the plan's
invariants, selection and weights, module vs reference, bad specs, example-spec numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec.common.select import stable_topk
from moespec.ops.sinkhorn import EPS, sinkhorn_plan
from moespec.reference.routers import RouteContext, route

ROOT = Path(__file__).resolve().parents[2]


def spec(d_model: int = 48, experts: int = 4, **router) -> dict:
    return {
        "moespec": 1,
        "name": "sinkhorn-test",
        "d_model": d_model,
        "layer": {
            "experts": {"routed": [{"count": experts, "kind": "mlp", "activation": "gelu", "d_ff": 16}]},
            "router": {"kind": "sinkhorn", **router},
            "capacity": {"kind": "dropless"},
        },
    }


def megatron_style_sinkhorn(cost: torch.Tensor, tol: float) -> torch.Tensor:
    """The uncapped while-loop, written out independently (on exp(cost - max))."""
    cost = torch.exp(cost - cost.max())
    d0, d1 = torch.ones(cost.shape[0]), torch.ones(cost.shape[1])
    error, d1_old, rounds = 1e9, d1, 0
    while error > tol:
        rounds += 1
        assert rounds < 2000, "did not converge"
        d0 = (1 / d0.shape[0]) / (torch.sum(d1 * cost, 1) + EPS)
        d1 = (1 / d1.shape[0]) / (torch.sum(d0[:, None] * cost, 0) + EPS)
        error = torch.mean(torch.abs(d1_old - d1))
        d1_old = d1
    return d1 * cost * d0[:, None]


def route_ref(x_TD, w_ED, training, **router):
    layer = moespec.load_spec(spec(x_TD.shape[1], w_ED.shape[0], **router)).spec.layer
    return route(x_TD, {"router.weight": w_ED}, layer.router, RouteContext(w_ED.shape[0], training))


# --- the Sinkhorn plan ---------------------------------------------------------------------


def test_plan_is_balanced_and_matches_the_while_loop():
    logits = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    plan = sinkhorn_plan(logits, iterations=2000, tol=1e-5)
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 1 / 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((40,), 1 / 40), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(plan, megatron_style_sinkhorn(logits, 1e-5), atol=1e-7, rtol=1e-5)
    assert plan.requires_grad is False


def test_plan_cap_and_early_stop():
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    # One iteration: rows scaled once, then columns once.
    cost = torch.exp(logits - logits.max())
    d0 = (1 / 16) / (cost.sum(1) + EPS)
    d1 = (1 / 4) / ((d0[:, None] * cost).sum(0) + EPS)
    torch.testing.assert_close(sinkhorn_plan(logits, 1, 0.0), d0[:, None] * cost * d1)
    # Past convergence more iterations change nothing.
    assert torch.equal(sinkhorn_plan(logits, 50, 1e-3), sinkhorn_plan(logits, 5000, 1e-3))


def test_plan_survives_huge_logits():
    logits = torch.tensor([[200.0, 0.0], [0.0, 200.0], [199.0, 1.0]])
    plan = sinkhorn_plan(logits, 100, 1e-4)
    assert plan.isfinite().all()


# --- routing invariants ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_selection_and_weights(k):
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(24, 48, generator=gen), torch.randn(4, 48, generator=gen)
    logits = x @ w.T
    probs = logits.sigmoid() if k == 1 else logits.softmax(-1)  # Megatron's default
    train = route_ref(x, w, True, k=k)
    assert torch.equal(train.topk_idx_TK, stable_topk(sinkhorn_plan(logits, 100, 1e-4), k))
    ev = route_ref(x, w, False, k=k)
    assert torch.equal(ev.topk_idx_TK, stable_topk(probs, k))
    for r in (train, ev):
        torch.testing.assert_close(r.topk_weight_TK, probs.gather(1, r.topk_idx_TK))  # not renormalised
    forced = route_ref(x, w, True, k=k, score="softmax")
    torch.testing.assert_close(forced.probs_TE, logits.softmax(-1))


def test_sinkhorn_spreads_a_skewed_router():
    gen = torch.Generator().manual_seed(3)
    x, w = 0.1 * torch.randn(64, 48, generator=gen), 0.1 * torch.randn(4, 48, generator=gen)
    x[:, 0] += 1.0
    w[0, 0] += 5.0  # every token's best expert is 0
    ev = route_ref(x, w, False)
    assert ev.tokens_per_expert().tolist() == [64, 0, 0, 0]
    train = route_ref(x, w, True).tokens_per_expert()
    assert train.max() <= 32 and train.min() >= 8, train.tolist()  # roughly even


def test_gradient_reaches_the_router_through_the_weights_only():
    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(12, 48, generator=gen), torch.randn(4, 48, generator=gen).requires_grad_()
    r = route_ref(x, w, True)
    r.topk_weight_TK.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    (x @ w2.T).sigmoid().gather(1, r.topk_idx_TK).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_custom_op_opcheck():
    a = torch.randn(12, 4, generator=torch.Generator().manual_seed(5))
    torch.library.opcheck(torch.ops.moespec.sinkhorn_topk, (a, 2, 100, 1e-4), test_utils=("test_faketensor",))
    assert torch.equal(
        torch.ops.moespec.sinkhorn_topk(a, 2, 100, 1e-4), stable_topk(sinkhorn_plan(a, 100, 1e-4), 2)
    )


# --- module vs reference ---------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t,d,k", [(1, 48, 1), (7, 100, 2), (64, 48, 1), (64, 100, 2)])
def test_module_matches_reference(compare, t, d, k, training):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t + d + k))
    compare(spec(d, k=k), (), x, training=training)


def test_module_all_tokens_alike_and_explicit_score(compare):
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(6)).expand(8, 48).contiguous()
    m, _ = compare(spec(score="softmax"), (), x, training=False)
    assert sorted(m.routing_stats["tokens_per_expert"].tolist()) == [0, 0, 0, 8]
    compare(spec(score="softmax", k=3, iterations=3, tol=0.0), (), x, training=True)


def test_module_fp64(compare):
    s = spec(k=2)
    s["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    compare(s, (), x, training=True, atol=1e-10, rtol=1e-10)


# --- specs -----------------------------------------------------------------------------------


def test_bad_specs():
    with pytest.raises(moespec.SpecError) as ei:
        moespec.load_spec(spec(k=5))
    assert "k=5 exceeds the number of routed experts (4)" in ei.value.diagnostics[0].message
    s = spec()
    s["layer"]["losses"] = {"load_balance": {"kind": "switch", "weight": 0.01}}
    with pytest.raises(moespec.SpecError, match="no load-balancing loss"):
        moespec.load_spec(s)
    for bad in ({"iterations": 0}, {"tol": -1.0}, {"score": "relu"}):
        with pytest.raises(moespec.SpecError):
            moespec.load_spec(spec(**bad))


def test_example_spec_numbers(explain_layer):
    lay = explain_layer(ROOT / "specs/sinkhorn.yaml")
    d, e, f = 2048, 64, 8192
    expert = 2 * d * f  # GELU MLP, no biases
    assert lay["params_total"] == e * expert + e * d
    assert lay["params_active"] == expert + e * d
    assert lay["flops_per_token"] == 2 * (d * e + 2 * d * f)
