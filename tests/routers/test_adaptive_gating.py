"""`kind: adaptive_gating`: module vs reference (with capacity too), the top-1 fallback rule
on hand-made probabilities, the three weight modes, bad specs and the example's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec.explain import explain_data
from moespec.lower.routers.adaptive_gating import adaptive_top2
from moespec.reference.routers import RouteContext, route
from moespec.reference.routers.adaptive_gating import adaptive_weights

SPECS = Path(__file__).resolve().parents[2] / "specs"
ADAPTIVE = str(SPECS / "adaptive-gating.yaml")


def tiny(d_model: int = 48, e: int = 4, capacity: dict | None = None, **router) -> dict:
    return {
        "moespec": 1,
        "name": "adaptive-tiny",
        "d_model": d_model,
        "layer": {
            "experts": {
                "routed": [{"count": e, "kind": "mlp", "activation": "gelu", "d_ff": 16, "bias": True}]
            },
            "router": {"kind": "adaptive_gating", **router},
            "capacity": capacity or {"kind": "dropless"},
            "losses": {"load_balance": {"kind": "switch", "weight": 0.01}, "z_loss": {"weight": 1e-3}},
        },
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("t", "d"), [(1, 48), (7, 100), (64, 48)])
@pytest.mark.parametrize("weights", ["kept", "top2", "raw"])
def test_module_matches_reference(compare, t, d, training, weights):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)) * 3
    compare(tiny(d, threshold=0.2, weights=weights), (), x, training=training)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_module_matches_reference_with_capacity(compare, policy):
    cap = {
        "kind": "factor",
        "train_factor": 0.5,
        "eval_factor": 1.0,
        "min_capacity": 0,
        "drop_policy": policy,
    }
    x = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(5)) * 3
    _, stats = compare(tiny(capacity=cap, threshold=0.3), (), x, training=True)
    assert float(stats.dropped_fraction) > 0


def test_module_matches_reference_fp64(compare):
    spec = tiny(threshold=0.15)
    spec["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    x = torch.randn(9, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    compare(spec, (), x, training=True, atol=1e-10, rtol=1e-10)


def test_top1_when_gap_exceeds_threshold_by_hand():
    p = torch.tensor(
        [
            [0.70, 0.20, 0.05, 0.05],  # gap 0.5 > 0.1: top-1 only
            [0.40, 0.35, 0.15, 0.10],  # gap 0.05 ≤ 0.1: top-2
            [0.30, 0.30, 0.30, 0.10],  # tie: experts 0 and 1 (lower index), gap 0: top-2
            [0.25, 0.50, 0.15, 0.10],  # best is expert 1; gap 0.25: top-1
        ]
    )
    layer = moespec.load_spec(tiny(d_model=4, threshold=0.1)).spec.layer
    r = route(p.log(), {"router.weight": torch.eye(4)}, layer.router, RouteContext(4, False))
    assert r.topk_idx_TK.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0]]
    assert r.active_TK[:, 1].tolist() == [False, True, True, False]
    assert r.selected_TE().sum(-1).tolist() == [1, 2, 2, 1]
    # `kept`: normalised over the experts used (a top-1 token gets 1).
    torch.testing.assert_close(r.gates_TE().sum(-1), torch.ones(4))
    torch.testing.assert_close(r.gates_TE()[1, :2], torch.tensor([0.40, 0.35]) / 0.75)


def test_weight_modes_reference_and_lowering_agree():
    p_TK = torch.tensor([[0.7, 0.2], [0.4, 0.35]])
    use2 = torch.tensor([False, True])
    expected = {
        "kept": torch.tensor([[1.0, 0.2 / 0.7], [0.4 / 0.75, 0.35 / 0.75]]),
        "top2": torch.tensor([[0.7 / 0.9, 0.2 / 0.9], [0.4 / 0.75, 0.35 / 0.75]]),
        "raw": p_TK,
    }
    for mode, want in expected.items():
        torch.testing.assert_close(adaptive_weights(p_TK, use2, mode), want)
        w, active = adaptive_top2(p_TK, 0.1, mode)
        torch.testing.assert_close(w, want)
        assert active[:, 1].tolist() == [False, True]
    # The inactive second slot's weight is never used: the combine masks it.


def test_threshold_extremes_give_top1_and_top2():
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(0)) * 3
    for thr, k in ((0.0, 1), (1.0, 2)):
        m = moespec.build(tiny(threshold=thr), seed=1)
        m.eval()
        m(x)
        assert int(m.routing_stats["routed_per_expert"].sum()) == 16 * k


def test_all_tokens_on_one_expert_and_empty_expert():
    from moespec.reference import moe_layer_reference

    spec = tiny(threshold=0.1)
    m = moespec.build(spec, seed=0)
    v = torch.randn(48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[3] = v
    x = v.expand(5, 48).clone()
    params = {k: t.detach().clone() for k, t in m.state_dict().items()}
    m.train()
    y = m(x)
    full = moespec.load_spec(spec).spec
    y_ref, aux_ref, stats = moe_layer_reference(x, params, full.layer, full.d_model, training=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(m.aux_loss, aux_ref)
    assert stats.routed_per_expert.tolist() == [0, 0, 0, 5]  # confident: top-1 only


def test_bad_specs(spec_error_text):
    assert "at least 2 routed experts (got 1)" in spec_error_text(tiny(e=1))
    assert "threshold" in spec_error_text(tiny(threshold=-0.1))
    assert "expected_k" in spec_error_text(tiny(expected_k=2.5))
    assert "weights" in spec_error_text(tiny(weights="softmax"))


def test_explain_numbers():
    lay = explain_data(moespec.load_spec(ADAPTIVE))["layers"][0]
    d, f, e, k = 768, 3072, 8, 2
    expert = 2 * d * f + f + d  # GELU MLP with biases
    assert lay["params_total"] == e * expert + e * d
    assert lay["params_active"] == k * expert + e * d
    assert lay["flops_per_token"] == 2 * (k * 2 * d * f + d * e)
    assert lay["experts_per_token"] == k
