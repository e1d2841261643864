"""`kind: top_p` (dynamic top-p): module vs reference, the smallest-prefix invariant on
hand-made probabilities (ties, max_k, exact threshold), the entropy loss, bad specs and the
example spec's derived numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec.explain import explain_data
from moespec.lower.routers.top_p import top_p_selected
from moespec.reference.routers import RouteContext, route
from moespec.reference.routers.top_p import mean_entropy, top_p_mask

SPECS = Path(__file__).resolve().parents[2] / "specs"
TOP_P = str(SPECS / "top-p-dynamic.yaml")


def tiny(d_model: int = 48, e: int = 6, losses: dict | None = None, **router) -> dict:
    return {
        "moespec": 1,
        "name": "top-p-tiny",
        "d_model": d_model,
        "layer": {
            "experts": {"routed": [{"count": e, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": {"kind": "top_p", **router},
            "capacity": {"kind": "dropless"},
            "losses": losses or {},
        },
    }


SWITCH = {"load_balance": {"kind": "switch", "weight": 0.01}, "z_loss": {"weight": 1e-3}}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("t", "d"), [(1, 48), (7, 100), (64, 48)])
def test_module_matches_reference(compare, t, d, training):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)) * 3
    compare(tiny(d, losses=SWITCH, entropy_weight=0.1), (), x, training=training)


@pytest.mark.parametrize("router", [{"renormalize": True, "max_k": 2}, {"threshold": 0.9, "expected_k": 3}])
def test_module_matches_reference_options(compare, router):
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3)) * 3
    compare(
        tiny(losses={"load_balance": {"kind": "switch", "weight": 0.01, "scope": "sequence"}}, **router),
        (),
        x,
        training=True,
    )


def test_module_matches_reference_fp64(compare):
    spec = tiny(entropy_weight=0.5, threshold=0.7)
    spec["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    x = torch.randn(9, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    compare(spec, (), x, training=True, atol=1e-10, rtol=1e-10)


def _both(probs, threshold, max_k=None):
    ref = top_p_mask(probs, threshold, max_k)
    fx = top_p_selected(probs, threshold, max_k or 0)
    assert torch.equal(ref, fx)
    return ref


def test_smallest_prefix_reaching_threshold_by_hand():
    p = torch.tensor(
        [
            [0.05, 0.50, 0.25, 0.20],  # 0.50 alone reaches 0.4 → {1}
            [0.30, 0.05, 0.35, 0.30],  # 0.35 < 0.4, 0.35+0.30 ≥ 0.4 → {2, 0} (tie 0.30: lower index)
            [0.25, 0.25, 0.25, 0.25],  # 0.25, 0.50 → {0, 1}
            [0.10, 0.20, 0.30, 0.40],  # 0.40 reaches exactly 0.4 → {3} (≥, not the code's >)
        ]
    )
    sel = _both(p, 0.4)
    expected = torch.tensor(
        [[0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(sel, expected)
    # Threshold 1: the prefix must reach 1, so every expert (the last crossing included).
    assert _both(p, 1.0).sum(-1).tolist() == [4, 4, 4, 4]
    # A cap: at most max_k experts, the best ones.
    assert _both(p, 0.95, max_k=2).sum(-1).tolist() == [2, 2, 2, 2]
    assert torch.equal(_both(p, 0.95, max_k=1), p.argmax(-1, keepdim=True) == torch.arange(4))


def test_selection_is_minimal_on_random_rows():
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(200, 8, generator=g) * 2).softmax(-1)
    for tau in (0.1, 0.4, 0.8):
        sel = _both(probs, tau)
        kept = (probs * sel).sum(-1)
        assert bool((kept >= tau - 1e-6).all())  # reaches τ
        # minimal: dropping the smallest kept expert falls below τ
        smallest = torch.where(sel, probs, torch.full_like(probs, 2.0)).min(-1).values
        assert bool((kept - smallest < tau).all())
        # a prefix: every kept probability ≥ every dropped one
        lo = torch.where(sel, probs, torch.full_like(probs, 2.0)).min(-1).values
        hi = torch.where(sel, torch.full_like(probs, -1.0), probs).max(-1).values
        assert bool((lo >= hi).all())


def test_router_weights_are_raw_probabilities_and_loss_is_entropy():
    layer = moespec.load_spec(tiny(entropy_weight=0.3, d_model=8)).spec.layer
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g)
    r = route(x, {"router.weight": w}, layer.router, RouteContext(6, True))
    p = (x @ w.T).softmax(-1)
    sel = top_p_mask(p, 0.4)
    torch.testing.assert_close(r.gates_TE(), p * sel)
    assert torch.equal(r.selected_TE(), sel)
    h = -(p * p.log()).sum(-1).mean()
    assert math.isclose(r.extra_loss.item(), 0.3 * h.item(), rel_tol=1e-5)
    assert r.k == 6  # no expected_k, no max_k: balance losses normalise by E


def test_entropy_is_finite_when_probabilities_underflow():
    logits = torch.tensor([[0.0, -1e4, 5.0]], requires_grad=True)
    h = mean_entropy(logits)
    h.backward()
    assert torch.isfinite(h) and bool(torch.isfinite(logits.grad).all())


def _module_vs_reference(m, spec, x, training):
    """Forward and aux loss of a module whose weights a test has set, against the reference."""
    from moespec.reference import moe_layer_reference

    full = moespec.load_spec(spec).spec
    params = {k: v.detach().clone() for k, v in m.state_dict().items()}
    m.train(training)
    y = m(x)
    y_ref, aux_ref, stats = moe_layer_reference(x, params, full.layer, full.d_model, training=training)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(m.aux_loss, aux_ref)
    assert torch.equal(m.routing_stats["routed_per_expert"], stats.routed_per_expert)
    return stats


def test_all_tokens_on_one_expert_and_empty_experts():
    spec = tiny(losses=SWITCH, entropy_weight=0.1)
    m = moespec.build(spec, seed=0)
    v = torch.randn(48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[2] = v  # logit |v|² for expert 2, 0 elsewhere: p_2 ≈ 1
    stats = _module_vs_reference(m, spec, v.expand(7, 48).clone(), training=True)
    assert stats.routed_per_expert.tolist() == [0, 0, 7, 0, 0, 0]


def test_per_token_expert_count_varies():
    spec = tiny(threshold=0.6)
    m = moespec.build(spec, seed=1)
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)) * 4
    _module_vs_reference(m, spec, x, training=False)
    with torch.no_grad():
        sel = top_p_mask((x @ m.router.weight.T).softmax(-1), 0.6)
    counts = sel.sum(-1)
    assert counts.min() >= 1 and counts.min() < counts.max()


def test_bad_specs(spec_error_text):
    bad = tiny(e=4, max_k=5, expected_k=5.0, losses={"load_balance": {"kind": "gshard", "weight": 0.01}})
    bad["layer"]["capacity"] = {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0}
    msg = spec_error_text(bad)
    assert "layer.router.max_k" in msg and "max_k=5 exceeds the number of routed experts (4)" in msg
    assert "layer.router.expected_k" in msg
    assert "needs capacity: dropless" in msg
    assert "layer.losses.load_balance" in msg and "gshard" in msg
    assert "threshold" in spec_error_text(tiny(threshold=0.0))
    assert "threshold" in spec_error_text(tiny(threshold=1.5))


def test_explain_numbers():
    lay = explain_data(moespec.load_spec(TOP_P))["layers"][0]
    d, f, e, k = 2048, 5504, 16, 1.8
    expert = 3 * d * f
    assert lay["params_total"] == e * expert + e * d
    assert lay["params_active"] == round(k * expert + e * d)
    assert lay["flops_per_token"] == round(2 * (k * expert + d * e))
    assert lay["experts_per_token"] == k
