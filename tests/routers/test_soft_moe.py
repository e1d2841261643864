"""`kind: soft_moe` (Puigcerver et al. 2023): the reference's defining invariants (dispatch
columns and combine rows are distributions, the output is the paper's formula, permutation
equivariance, per-sequence groups), the built module against the reference (forward, grads,
stats; odd shapes, train/eval), the spec checks and the example spec's numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moespec
from moespec.reference import moe_layer_reference
from moespec.reference.routers import RouteContext, SoftRouting, route

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "soft-moe.yaml"


def spec(d_model: int = 48, n: int = 4, p: int = 1, **router) -> dict:
    """A tiny Soft MoE spec: n GELU MLP experts (with biases) of width 32, p slots each."""
    return {
        "moespec": 1,
        "name": "soft",
        "d_model": d_model,
        "layer": {
            "experts": {
                "routed": [{"count": n, "kind": "mlp", "activation": "gelu", "d_ff": 32, "bias": True}]
            },
            "router": {"kind": "soft_moe", "slots_per_expert": p, "group_size": 16, **router},
        },
    }


def randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(s: dict, x: torch.Tensor, *, seed: int = 3, training: bool = False):
    """``(y, aux, stats, params, layer)`` of the reference with the module's initial params."""
    m = moespec.build(s, seed=seed)
    full = moespec.load_spec(s).spec
    params = {k: v.detach().clone().to(x.dtype) for k, v in m.state_dict().items()}
    y, aux, stats = moe_layer_reference(x, params, full.layer, full.d_model, training=training)
    return y, aux, stats, params, full.layer


# --- the reference's invariants -------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
def test_dispatch_and_combine_are_distributions(shape):
    x = randn(*shape, dtype=torch.float64)
    s = spec(p=2, dtype="fp64")
    _, _, stats, _, layer = reference(s, x)
    rt = stats.routing
    assert isinstance(rt, SoftRouting)
    t, n_slots = x.numel() // 48, 4 * 2
    assert rt.dispatch_TS.shape == rt.combine_TS.shape == rt.logits_TS.shape == (t, n_slots)
    groups = shape[0] if len(shape) == 3 else 1
    # Each slot is a convex combination of the tokens of its group (per sequence), each token
    # a convex combination of all slots.
    col_sums = rt.dispatch_TS.reshape(groups, -1, n_slots).sum(1)
    torch.testing.assert_close(col_sums, torch.ones_like(col_sums))
    torch.testing.assert_close(rt.combine_TS.sum(-1), torch.ones(t, dtype=torch.float64))
    assert (rt.dispatch_TS > 0).all() and (rt.combine_TS > 0).all()
    assert layer.router.causal is False


def _manual(x_TD: torch.Tensor, params: dict, n: int, p: int, normalize: bool) -> torch.Tensor:
    """Algorithm 1 of the paper, written independently: one group, GELU MLP experts."""
    phi_DS = params["router.weight"].T  # [d, n·p], the paper's Φ
    if normalize:
        x_hat = x_TD / torch.sqrt((x_TD**2).sum(1, keepdim=True) + 1e-6)
        phi_hat = phi_DS / torch.sqrt((phi_DS**2).sum(0, keepdim=True) + 1e-6)
        logits = x_hat @ (params["router.scale"] * phi_hat)
    else:
        logits = x_TD @ phi_DS
    d_weights = torch.softmax(logits, dim=0)
    c_weights = torch.softmax(logits, dim=1)
    xs = d_weights.T @ x_TD
    ys = []
    for i in range(n * p):
        e = i // p
        h = F.gelu(xs[i] @ params["experts.0.w_up"][e].T + params["experts.0.b_up"][e])
        ys.append(h @ params["experts.0.w_down"][e].T + params["experts.0.b_down"][e])
    return c_weights @ torch.stack(ys)


@pytest.mark.parametrize(("p", "normalize"), [(1, True), (2, True), (3, False)])
def test_output_is_the_papers_formula(p, normalize):
    x = randn(9, 48, dtype=torch.float64)
    s = spec(p=p, normalize=normalize, dtype="fp64")
    y, aux, _, params, _ = reference(s, x)
    if normalize:
        params["router.scale"].fill_(1.7)  # a learned scale != 1 must multiply the logits
        y, aux, _ = moe_layer_reference(x, params, *_layer_d(s), training=False)
    torch.testing.assert_close(y, _manual(x, params, 4, p, normalize))
    assert float(aux) == 0.0


def _layer_d(s: dict):
    full = moespec.load_spec(s).spec
    return full.layer, full.d_model


def test_plain_variant_has_no_scale():
    m = moespec.build(spec(normalize=False))
    assert "router.scale" not in dict(m.named_parameters())
    assert dict(m.named_parameters())["router.weight"].shape == (4, 48)
    m2 = moespec.build(spec(p=3))
    assert dict(m2.named_parameters())["router.weight"].shape == (12, 48)
    assert dict(m2.named_parameters())["router.scale"].shape == ()


def test_normalized_logits_ignore_token_scale():
    """X̂ = l2norm(X): scaling a token leaves every routing weight unchanged."""
    s = spec(dtype="fp64")
    _, _, _, params, layer = reference(s, randn(2, 48))
    x = randn(6, 48, dtype=torch.float64)
    params = {k: v.double() for k, v in params.items()}
    ctx = RouteContext(4, False)
    a = route(x, params, layer.router, ctx)
    b = route(x * torch.linspace(0.5, 4.0, 6, dtype=torch.float64)[:, None], params, layer.router, ctx)
    torch.testing.assert_close(a.combine_TS, b.combine_TS)
    torch.testing.assert_close(a.dispatch_TS, b.dispatch_TS)


@pytest.mark.parametrize("training", [True, False])
def test_permutation_equivariance(training):
    """Permuting the tokens of a group permutes the outputs (module and reference)."""
    s = spec(p=2, dtype="fp64")
    x = randn(11, 48, dtype=torch.float64)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    y, *_ = reference(s, x, training=training)
    y_perm, *_ = reference(s, x[perm], training=training)
    torch.testing.assert_close(y_perm, y[perm])
    m = moespec.build(s, seed=3).double().train(training)
    torch.testing.assert_close(m(x[perm]), m(x)[perm])
    torch.testing.assert_close(m(x), y)


def test_sequences_are_separate_groups():
    """A 3-D input routes each sequence on its own: a sequence's output does not depend on
    the rest of the batch (the paper's per-image groups), unlike one flat group."""
    s = spec()
    x = randn(3, 5, 48)
    m = moespec.build(s, seed=3)
    y = m(x)
    for b in range(3):
        torch.testing.assert_close(m(x[b : b + 1]), y[b : b + 1])
        torch.testing.assert_close(m(x[b]), y[b])  # 2-D: one group of 5 tokens
    flat = m(x.reshape(15, 48))
    assert not torch.allclose(flat, y.reshape(15, 48))


# --- module == reference ----------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("d_model", [48, 100])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_module_matches_reference(compare, t, d_model, training):
    compare(spec(d_model=d_model, p=2), (), randn(t, d_model, seed=t), training=training)


@pytest.mark.parametrize("training", [True, False])
def test_module_matches_reference_3d(compare, training):
    compare(spec(p=1), (), randn(3, 7, 48), training=training)


@pytest.mark.parametrize(
    "overrides",
    [
        ("layer.router.normalize=false",),
        ("layer.router.slots_per_expert=3",),
        ("layer.experts.routed.0.kind=glu", "layer.experts.routed.0.activation=silu"),
        ("layer.router.dtype=fp64",),
    ],
)
def test_module_matches_reference_variants(compare, overrides):
    compare(spec(), overrides, randn(10, 48), training=True)


def test_shared_experts_and_expert_groups(compare):
    s = spec()
    s["layer"]["experts"]["routed"] = [
        {"count": 2, "kind": "mlp", "activation": "gelu", "d_ff": 32, "bias": True},
        {"count": 3, "kind": "glu", "activation": "silu", "d_ff": 16},
    ]
    s["layer"]["experts"]["shared"] = {
        "count": 1,
        "kind": "glu",
        "activation": "silu",
        "d_ff": 24,
        "gate": True,
    }
    compare(s, ("layer.router.slots_per_expert=2",), randn(2, 6, 48), training=True)


def test_sharp_routing(compare):
    """A large learned scale makes dispatch and combine nearly one-hot (a slot ~ one token)."""
    s = spec(dtype="fp64")
    compare(s, (), randn(9, 48) * 3.0, training=False)
    x = randn(9, 48, dtype=torch.float64)
    _, _, _, params, layer = reference(s, x)
    params["router.scale"].fill_(200.0)
    rt = route(x, params, layer.router, RouteContext(4, False))
    assert rt.dispatch_TS.max(0).values.min() > 0.9 and rt.combine_TS.max(1).values.min() > 0.5


def test_fp64_module_matches_reference():
    s = spec(p=2, dtype="fp64")
    x = randn(13, 48, dtype=torch.float64)
    y, *_ = reference(s, x)
    m = moespec.build(s, seed=3).double()
    torch.testing.assert_close(m(x), y, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 48), (2, 4, 48)])
def test_stats(run_both, shape):
    m, _, _, (_, _, aux, stats) = run_both(spec(p=2), (), randn(*shape), training=True)
    groups = shape[0] if len(shape) == 3 else 1
    rows = torch.full((4,), 2 * groups)
    assert torch.equal(stats.tokens_per_expert, rows) and torch.equal(stats.routed_per_expert, rows)
    assert stats.dropped_fraction == 0.0 and stats.load_ratio == 1.0
    assert 0 < stats.router_entropy <= math.log(8)
    rs = m.routing_stats
    assert torch.equal(rs["tokens_per_expert"], rows) and torch.equal(rs["routed_per_expert"], rows)
    assert float(rs["dropped_fraction"]) == 0.0 and float(rs["load_ratio"]) == 1.0
    assert float(rs["router_entropy"]) == pytest.approx(stats.router_entropy, rel=1e-5)
    assert m.router_logits.shape == (math.prod(shape[:-1]), 8)
    assert float(m.aux_loss) == 0.0 and float(aux) == 0.0
    assert torch.equal(stats.sorted.offsets_E1, torch.arange(5) * 2 * groups)


@pytest.mark.parametrize("shape", [(0, 48), (2, 0, 48), (0, 3, 48)])
def test_empty_inputs(shape):
    s = spec(p=2)
    x = randn(*shape)
    y, _, stats, *_ = reference(s, x)
    m = moespec.build(s, seed=3)
    assert m(x).shape == y.shape == shape
    rows = 0 if shape[0] == 0 and len(shape) == 3 else 2  # no sequence: no slots at all
    assert m.routing_stats["tokens_per_expert"].tolist() == stats.tokens_per_expert.tolist() == [rows] * 4


def test_graph_has_no_sort_and_uses_the_grouped_op():
    m = moespec.build(spec())
    code = m.graph_module.code
    assert "torch.ops.moespec.expert_ffn" in code and "mix_slots" in code and "unmix_slots" in code
    assert "sort_by_expert" not in code and "sort_selected" not in code


def test_export_with_dynamic_tokens():
    m = moespec.build(spec()).eval()
    dim = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(m, (randn(9, 48),), dynamic_shapes={"x": {0: dim}})
    for t in (2, 33):
        x = randn(t, 48, seed=t)
        torch.testing.assert_close(ep.module()(x), m(x))


# --- spec checks ------------------------------------------------------------------------------


def test_autoregressive_is_an_error(spec_diagnostics):
    ((path, msg),) = spec_diagnostics(spec(autoregressive=True))
    assert path == "layer.router.autoregressive" and "causal decoder" in msg
    assert moespec.load_spec(spec()).spec.layer.router.causal is False


@pytest.mark.parametrize(
    ("key", "value", "path", "words"),
    [
        (
            "capacity",
            {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0},
            "layer.capacity",
            "dropless",
        ),
        (
            "losses",
            {"load_balance": {"kind": "switch", "weight": 0.01}},
            "layer.losses.load_balance",
            "balanced",
        ),
        ("losses", {"z_loss": {"weight": 0.001}}, "layer.losses.z_loss", "z-loss"),
    ],
)
def test_layer_options_that_do_not_apply(key, value, path, words, spec_diagnostics):
    s = spec()
    s["layer"][key] = value
    ((got, msg),) = spec_diagnostics(s)
    assert got == path and words in msg


def test_zero_compute_experts_are_an_error(spec_diagnostics):
    s = spec()
    s["layer"]["experts"]["zero_compute"] = [{"kind": "zero", "count": 1}]
    ((path, msg),) = spec_diagnostics(s)
    assert path == "layer.experts.zero_compute" and "not supported" in msg


def test_all_problems_reported_at_once(spec_diagnostics):
    s = spec(autoregressive=True)
    s["layer"]["capacity"] = {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0}
    s["layer"]["losses"] = {"load_balance": {"kind": "switch", "weight": 0.01}, "z_loss": {"weight": 0.1}}
    assert len(spec_diagnostics(s)) == 4


@pytest.mark.parametrize(
    ("field", "value"), [("slots_per_expert", 0), ("group_size", 0), ("group_size", None)]
)
def test_bad_fields(field, value, spec_diagnostics):
    s = spec()
    if value is None:
        del s["layer"]["router"][field]
    else:
        s["layer"]["router"][field] = value
    ((path, _),) = spec_diagnostics(s)
    assert path.startswith("layer.router")


# --- the example spec's numbers -----------------------------------------------------------


def test_example_spec_numbers(explain_layer):
    layer = explain_layer(SPEC)
    d, f, n, p, group = 768, 3072, 128, 1, 196  # ViT-B/16, 128 experts, 1 slot, (224/16)^2
    expert = 2 * d * f + f + d  # MLP with biases
    router = n * p * d + 1  # Φ and the scalar scale
    k = n * p / group  # expert FFNs run per token
    assert layer["experts_per_token"] == pytest.approx(k)
    assert layer["params_router"] == router
    assert layer["params_total"] == router + n * expert == 604_569_601
    assert layer["params_active"] == round(router + k * expert)
    # 2 FLOPs per MAC: logits, X~ = D^T X and Y = C Y~ (each d·n·p per token), k expert MLPs.
    assert layer["flops_per_token"] == round(2 * (3 * d * n * p + k * 2 * d * f))
