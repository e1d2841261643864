"""`kind: dselect_k` (DSelect-k, Hazimeh et al. 2021): smooth-step binary-code selectors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec import SpecError
from moespec.lower.routers.dselect_k import dselect_k_weights
from moespec.reference import moe_layer_reference
from moespec.reference.routers import RouteContext, route
from moespec.reference.routers.dselect_k import selector_outputs, smooth_step

ROOT = Path(__file__).resolve().parents[2]


def spec(n=4, d=32, *, router=None, **layer):
    return {
        "moespec": 1,
        "name": "dselect-test",
        "d_model": d,
        "layer": {
            "experts": {"routed": [{"count": n, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": {"kind": "dselect_k", "k": 2, **(router or {})},
            "capacity": {"kind": "dropless"},
            **layer,
        },
    }


def x_of(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def saturate(m, bits: list[list[float]]):
    """Router weights that ignore x: selector l's bit logits are ``bits[l]`` (|z| >= γ/2 saturates)."""
    with torch.no_grad():
        m.router.z_weight.zero_()
        m.router.z_bias.copy_(torch.tensor(bits).flatten())
    return m


def check_module(m, s, x, training, atol=1e-5, rtol=1e-4):
    """Module == reference on ``m``'s own (possibly edited) parameters: y, aux, all grads."""
    m.train(training)
    full = moespec.load_spec(s).spec
    params = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in m.state_dict().items()}
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = m(x1)
    y2, a2, _ = moe_layer_reference(x2, params, full.layer, full.d_model, training=training)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
    torch.testing.assert_close(m.aux_loss, a2, atol=atol, rtol=rtol)
    (y1.sum() + m.aux_loss).backward()
    (y2.sum() + a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    for name, p in m.named_parameters():
        ref = params[name].grad
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(
            got, torch.zeros_like(p) if ref is None else ref, atol=atol, rtol=rtol, msg=name
        )


# --- the smooth step ------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.3, 4.0])
def test_smooth_step_properties(gamma):
    t = torch.tensor([-gamma, -gamma / 2, 0.0, gamma / 2, gamma], dtype=torch.float64, requires_grad=True)
    s = smooth_step(t, gamma)
    assert s.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    (g,) = torch.autograd.grad(s.sum(), t)
    assert g[[0, 1, 3, 4]].abs().max() < 1e-12 and g[2] == pytest.approx(1.5 / gamma)
    # C¹: the slope tends to 0 from inside at both ends; monotone; symmetric S(-t) = 1 - S(t).
    inner = torch.tensor([-gamma / 2 + 1e-6, gamma / 2 - 1e-6], dtype=torch.float64, requires_grad=True)
    (g_in,) = torch.autograd.grad(smooth_step(inner, gamma).sum(), inner)
    assert g_in.abs().max() < 1e-4
    grid = torch.linspace(-gamma, gamma, 401, dtype=torch.float64)
    sg = smooth_step(grid, gamma)
    assert torch.all(sg[1:] >= sg[:-1])
    torch.testing.assert_close(smooth_step(-grid, gamma), 1 - sg)


def test_lowering_smooth_step_form_matches_reference_with_grads():
    """The lowering writes S as the cubic of clamp(t); the reference as nested where()."""
    torch.manual_seed(0)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    zw = torch.randn(3 * 3, 6, dtype=torch.float64, requires_grad=True)
    zb, aw, ab = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((9,), (3, 6), (3,)))
    w1, _, sel, extra = dselect_k_weights(x, zw, zb, aw, ab, 3, 6, 1.0, 0.5, 1.0)
    z = (x @ zw.T + zb).reshape(9, 3, 3)
    r = selector_outputs(smooth_step(z, 1.0), 6)
    w2 = ((x @ aw.T + ab).softmax(-1)[:, :, None] * r).sum(1)
    torch.testing.assert_close(w1, w2)
    assert torch.equal(sel, w1 > 0)
    g1 = torch.autograd.grad((w1.square().sum() + extra), (x, zw, zb, aw, ab))
    ent = -(r * torch.log(r + 1e-6)).sum((1, 2)).mean()
    reach = (1 / r.sum(-1).clamp(min=1e-6)).sum(-1).mean()
    g2 = torch.autograd.grad(w2.square().sum() + 0.5 * ent + reach, (x, zw, zb, aw, ab))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


# --- the method's invariants ------------------------------------------------------------


def _route(m, s, x, training=True):
    layer = moespec.load_spec(s).spec.layer
    params = {k: v.detach() for k, v in m.state_dict().items()}
    return route(x, params, layer.router, RouteContext(layer.experts.n_routed, training))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_weights_sum_to_one_for_power_of_two(n):
    s = spec(n=n)
    r = _route(moespec.build(s), s, x_of(13, 32))
    torch.testing.assert_close(r.gates_TE().sum(-1), torch.ones(13))
    assert torch.all(r.gates_TE() >= 0)


def test_weights_sum_at_most_one_otherwise():
    s = spec(n=5)
    r = _route(moespec.build(s), s, x_of(13, 32))
    w = r.gates_TE().sum(-1)
    assert torch.all(w <= 1 + 1e-6) and torch.all(w > 0.5)


def test_dense_while_unsaturated():
    """At init |z| <= γ/100, far inside the cubic: every expert has w > 0 and runs."""
    m = moespec.build(spec(n=4))
    m(x_of(10, 32))
    assert m.routing_stats["routed_per_expert"].tolist() == [10, 10, 10, 10]


def test_saturated_selection_is_exactly_k_sparse_and_follows_the_codes():
    # m = 3 bits for 8 experts, most significant first: (+,-,+) -> 0b101 = 5; (-,+,+) -> 3.
    s = spec(n=8)
    m = saturate(moespec.build(s), [[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])
    x = x_of(6, 32)
    r = _route(m, s, x)
    w = r.gates_TE()
    assert torch.equal((w > 0).sum(-1), torch.full((6,), 2))
    assert torch.equal((w > 0).nonzero()[:, 1].reshape(6, 2), torch.tensor([[3, 5]] * 6))
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    m(x)
    assert m.routing_stats["routed_per_expert"].tolist() == [0, 0, 0, 6, 0, 6, 0, 0]
    # The weights of the two experts are the selector softmax α.
    alpha = (x @ m.router.alpha_weight.detach().T + m.router.alpha_bias.detach()).softmax(-1)
    torch.testing.assert_close(w[:, [5, 3]], alpha)


def test_two_selectors_on_one_expert_use_one_row():
    s = spec(n=4)
    m = saturate(moespec.build(s), [[1.0, 1.0], [1.0, 1.0]])
    m(x_of(5, 32))
    assert m.routing_stats["routed_per_expert"].tolist() == [0, 0, 0, 5]


def test_regularisers_by_hand():
    # z = 0 everywhere: S = 1/2, each selector is uniform over the 2^m codes.
    s = spec(n=5, router={"k": 2, "entropy_weight": 0.1, "reachability_weight": 2.0})
    m = moespec.build(s)
    with torch.no_grad():
        m.router.z_weight.zero_(), m.router.z_bias.zero_()
    x = x_of(7, 32)
    m(x)
    r = 1 / 8  # 8 codes, 5 reachable experts
    entropy = 2 * 5 * -(r * math.log(r + 1e-6))
    reach = 2 * 1 / (5 * r)
    torch.testing.assert_close(m.aux_loss, torch.tensor(0.1 * entropy + 2.0 * reach))
    m.eval()
    m(x)
    assert m.aux_loss.item() == 0.0  # regularisers are training-only (the code's `if training`)
    s2 = spec(n=4, router={"k": 2, "entropy_weight": 0.0})
    m2 = moespec.build(s2)
    m2(x)
    assert m2.aux_loss.item() == 0.0  # power of 2: no reachability term


def test_router_logits_are_the_weights():
    s = spec()
    m = moespec.build(s)
    x = x_of(3, 32)
    m(x)
    torch.testing.assert_close(m.router_logits, _route(m, s, x).gates_TE())


# --- module == reference --------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("n", "router"),
    [
        (4, {}),
        (5, {"entropy_weight": 0.01}),
        (2, {"k": 1}),
        (8, {"k": 3, "gamma": 0.5, "entropy_weight": 0.1}),
    ],
)
def test_module_matches_reference(compare, n, router, training):
    compare(spec(n=n, router=router), (), x_of(2, 7, 32, seed=1), training=training)


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d", [48, 100])
def test_odd_shapes(compare, t, d):
    compare(spec(n=6, d=d, router={"entropy_weight": 0.01}), (), x_of(t, d, seed=t), training=True)


@pytest.mark.parametrize("training", [True, False])
def test_partly_saturated_module_matches_reference(training):
    """Some selectors saturated, some not; an expert with no tokens; gradients through both."""
    s = spec(n=8, router={"entropy_weight": 0.05})
    m = saturate(moespec.build(s), [[1.0, -1.0, 0.2], [-1.0, 0.3, 1.0]])
    with torch.no_grad():
        m.router.z_weight[2].normal_(0, 0.05)
    check_module(m, s, x_of(9, 32), training)
    assert (m.routing_stats["routed_per_expert"] == 0).any()


def test_selector_saturated_on_an_unreachable_code_stays_finite():
    """E = 5: code 0b111 is no expert. The code's 1/sum(r) is inf there; ours is clamped."""
    s = spec(n=5)
    m = saturate(moespec.build(s), [[1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
    check_module(m, s, x_of(4, 32), True)
    assert torch.isfinite(m.aux_loss) and m.aux_loss > 1e5
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.routing_stats["routed_per_expert"].tolist() == [0, 4, 0, 0, 0]


def test_fp64(compare):
    s = {**spec(n=5, router={"entropy_weight": 0.1}), "target": {"dtype": "fp64", "router_dtype": "fp64"}}
    compare(s, (), x_of(7, 32).double(), training=True, atol=1e-10, rtol=1e-10)


def test_compile_fullgraph_and_export():
    """Dense and saturated routings through one compiled graph (the row count N is dynamic)."""
    m = moespec.build(spec(n=5, router={"entropy_weight": 0.1}))
    x = x_of(6, 32)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))
    saturate(m, [[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])
    torch.testing.assert_close(compiled(x), m(x))
    m.eval()
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(2 * x), m(2 * x))


# --- spec checks and numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "layer", "router", "message"),
    [
        (4, {}, {"k": 5}, "k=5 exceeds the number of routed experts (4)"),
        (1, {}, {"k": 1}, "at least 2 routed experts"),
        (4, {"losses": {"load_balance": {"kind": "switch", "weight": 0.01}}}, {}, "no balance loss"),
        (4, {"losses": {"z_loss": {"weight": 0.01}}}, {}, "no per-expert logits"),
    ],
)
def test_bad_specs(n, layer, router, message):
    with pytest.raises(SpecError) as ei:
        moespec.load_spec(spec(n=n, router=router, **layer))
    assert message in str(ei.value)


def test_explain_numbers_of_the_example_spec(explain_layer):
    layer = explain_layer(ROOT / "specs/dselect-k.yaml")
    d, f, e, k, m = 512, 2048, 16, 2, 4  # m = log2(16) bits
    expert = 2 * d * f  # ReLU MLP, no biases
    router = (k * m * d + k * m) + (k * d + k)  # z_weight, z_bias, alpha_weight, alpha_bias
    assert layer["params_total"] == e * expert + router
    assert layer["params_active"] == k * expert + router  # at inference, once saturated
    assert layer["flops_per_token"] == 2 * (d * k * (m + 1) + k * d * f * 2)
