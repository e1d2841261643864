"""`kind: relu` (ReMoE): module vs reference, the routing's invariants, the L1 term by hand,
the λ controller, bad specs and the example spec's derived numbers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec.explain import explain_data
from moespec.reference.routers import RouteContext, route
from moespec.reference.routers.relu import l1_balance_loss, update_l1_coeff

SPECS = Path(__file__).resolve().parents[2] / "specs"
REMOE = str(SPECS / "remoe.yaml")


def tiny(d_model: int = 48, e: int = 4, k: int = 1, **router) -> dict:
    return {
        "moespec": 1,
        "name": "relu-tiny",
        "d_model": d_model,
        "layer": {
            "experts": {"routed": [{"count": e, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": {"kind": "relu", "k": k, **router},
            "capacity": {"kind": "dropless"},
        },
    }


def _spec(d: dict):
    full = moespec.load_spec(d).spec
    return full.layer, full.d_model


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("t", "d"), [(1, 48), (7, 100), (64, 48)])
def test_module_matches_reference(compare, t, d, training):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t))
    m, _ = compare(tiny(d, l1_coeff_init=0.3), (), x, training=training)
    assert m.aux_loss.item() > 0  # the L1 term is there, weighted by λ = 0.3


def test_module_matches_reference_with_jitter_and_z_loss_3d(compare):
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    spec = tiny(jitter=0.1, l1_coeff_init=0.05)
    spec["layer"]["losses"] = {"z_loss": {"weight": 1e-3}}
    compare(spec, (), x, training=True)


def test_module_matches_reference_fp64(compare):
    spec = tiny(e=6, k=2, l1_coeff_init=0.2)
    spec["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    x = torch.randn(9, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    compare(spec, (), x, training=True, atol=1e-10, rtol=1e-10)


def _set_router(m, w):
    with torch.no_grad():
        m.router.weight.copy_(w)


def test_empty_expert_and_all_tokens_on_one_expert():
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(0)).abs()  # x > 0
    m = moespec.build(tiny(l1_coeff_init=0.1), seed=3)
    # Expert 0 fires for every token (positive weights on positive x); the others never.
    w = torch.zeros(4, 48)
    w[0] = 0.05
    w[1:] = -0.05
    _set_router(m, w)
    m.train()
    m(x)
    assert m.routing_stats["routed_per_expert"].tolist() == [7, 0, 0, 0]


def test_all_tokens_on_one_expert_vs_reference():
    """Module == reference with a router that sends everything to expert 0."""
    from moespec.reference import moe_layer_reference

    spec = tiny(l1_coeff_init=0.1)
    layer, d = _spec(spec)
    m = moespec.build(spec, seed=3)
    w = torch.zeros(4, 48)
    w[0], w[1:] = 0.05, -0.05
    _set_router(m, w)
    m.eval()
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(0)).abs()
    params = {k: v.detach().clone() for k, v in m.state_dict().items()}
    y_ref, aux_ref, stats = moe_layer_reference(x, params, layer, d, training=False)
    torch.testing.assert_close(m(x), y_ref)
    torch.testing.assert_close(m.aux_loss, aux_ref)
    assert stats.routed_per_expert.tolist() == [7, 0, 0, 0]


def _route(x, w, spec_dict, lam=1.0, training=False):
    layer, _ = _spec(spec_dict)
    params = {"router.weight": w, "router.l1_coeff": torch.tensor(lam)}
    return route(x, params, layer.router, RouteContext(w.shape[0], training))


def test_gates_are_relu_and_selection_is_positive_part():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(11, 48, generator=g), torch.randn(4, 48, generator=g) * 0.1
    r = _route(x, w, tiny())
    z = x @ w.T
    torch.testing.assert_close(r.gates_TE(), torch.relu(z))
    assert torch.equal(r.selected_TE(), z > 0)
    # Per-token k varies (data-dependent), unnormalised weights.
    counts = r.selected_TE().sum(-1)
    assert counts.min() < counts.max()


def test_tokens_with_no_positive_logit_output_zero():
    """A token whose logits are all ≤ 0 uses no expert: its output is exactly 0 (no shared
    expert, no renormalisation), while the other tokens are computed as usual."""
    m = moespec.build(tiny(), seed=0)
    v = torch.randn(48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[1.0], [0.5], [0.2], [0.1]]) * v)
    x = torch.stack([v, -v, 0.5 * v])  # logits: all > 0, all < 0, all > 0
    m.train()
    y = m(x)
    assert torch.count_nonzero(y[1]) == 0
    assert torch.count_nonzero(y[0]) > 0 and torch.count_nonzero(y[2]) > 0
    assert m.routing_stats["routed_per_expert"].tolist() == [2, 2, 2, 2]


def test_l1_term_by_hand():
    r = torch.tensor([[0.5, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0], [0.25, 0.0, 3.0, 0.0]])
    lam, k, t, e = 0.7, 2, 3, 4
    # n_e = [2, 0, 1, 2]; Σ_t R = [0.75, 0, 3, 3]
    expected = lam * e * sum(s / t * n / (t * k) for s, n in zip([0.75, 0, 3, 3], [2, 0, 1, 2], strict=True))
    got = l1_balance_loss(r, torch.tensor(lam), k)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    # Through the router: x = I and W = R^T give logits R (all >= 0), so extra_loss is that term.
    routed = _route(torch.eye(3), r.T.contiguous(), tiny(d_model=3, k=k), lam)
    torch.testing.assert_close(routed.gates_TE(), r)
    assert math.isclose(routed.extra_loss.item(), expected, rel_tol=1e-6)


def test_controller_update_rule():
    lam = torch.tensor(1e-3)
    e, t = 4, 10
    dense = torch.tensor([10, 10, 10, 10])  # density 1 > k/E: too dense, λ grows
    sparse = torch.tensor([1, 0, 0, 0])  # density 0.025 < 0.25: λ shrinks
    assert math.isclose(update_l1_coeff(lam, dense, t, 1, 1.2).item(), 1.2e-3, rel_tol=1e-6)
    assert math.isclose(update_l1_coeff(lam, sparse, t, 1, 1.2).item(), 1e-3 / 1.2, rel_tol=1e-6)
    exact = torch.tensor([3, 3, 2, 2])  # density 10/40 = k/E: not sparser than target → λ/α
    assert update_l1_coeff(lam, exact, t, 1, 1.2).item() < 1e-3
    assert update_l1_coeff(lam, dense, 0, 1, 1.2).item() == lam.item()  # no tokens: unchanged
    assert e == dense.numel()


def test_module_controller_matches_reference_update():
    m = moespec.build(tiny(l1_coeff_init=1e-2), seed=1)
    m.train()
    x = torch.randn(9, 48, generator=torch.Generator().manual_seed(5))
    before = m.router.l1_coeff.clone()
    m(x)
    routed = m.routing_stats["routed_per_expert"]
    expected = update_l1_coeff(before, routed, 9, 1, 1.2)
    torch.testing.assert_close(m.router.l1_coeff, expected)
    m.eval()
    m(x)  # eval forwards leave λ alone
    torch.testing.assert_close(m.router.l1_coeff, expected)


def test_backward_after_controller_update():
    """after_forward updates λ in place before backward: the graph kept its own copy."""
    m = moespec.build(tiny(l1_coeff_init=0.5), seed=1)
    m.train()
    y = m(torch.randn(6, 48))
    (y.sum() + m.aux_loss).backward()
    assert m.router.weight.grad is not None


def _density(m, x):
    with torch.no_grad():
        return (torch.relu(x @ m.router.weight.T) > 0).float().mean().item()


def test_controller_drives_density_down_when_too_dense():
    """SGD on the aux loss alone, from a router where every expert fires for every token
    (density 1 > k/E = 1/4): λ grows by α each step while too dense, the growing L1 pressure
    lowers the density below the target, after which λ shrinks again."""
    m = moespec.build(tiny(e=4, k=1, l1_coeff_init=1e-3), seed=2)
    x = torch.randn(32, 48, generator=torch.Generator().manual_seed(7)) * 0.3 + 1.0
    with torch.no_grad():
        m.router.weight.add_(0.02)
    opt = torch.optim.SGD([m.router.weight], lr=0.02)
    m.train()
    dens, lams = [_density(m, x)], [m.router.l1_coeff.item()]
    for _ in range(30):
        opt.zero_grad()
        m(x)
        m.aux_loss.backward()
        opt.step()
        dens.append(_density(m, x))
        lams.append(m.router.l1_coeff.item())
    assert dens[0] == 1.0
    grow = [i for i in range(30) if dens[i] > 0.25]  # λ after step i reacts to dens[i]
    assert len(grow) >= 10
    for i in grow:
        assert math.isclose(lams[i + 1], lams[i] * 1.2, rel_tol=1e-5)
    assert dens[-1] < 0.25  # sparser than the target now ...
    assert lams[-1] < max(lams)  # ... so λ came down from its peak


def test_controller_lowers_lambda_when_too_sparse():
    m = moespec.build(tiny(e=4, k=2, l1_coeff_init=1e-2), seed=2)
    with torch.no_grad():
        m.router.weight.fill_(-0.1)  # no expert fires for positive inputs: sparsity 1 > 1/2
    x = torch.rand(16, 48) + 0.1
    m.train()
    lams = [m.router.l1_coeff.item()]
    for _ in range(3):
        m(x)
        lams.append(m.router.l1_coeff.item())
    assert all(b < a for a, b in itertools.pairwise(lams))
    assert math.isclose(lams[-1], 1e-2 / 1.2**3, rel_tol=1e-5)


def test_buffer_in_state_dict_not_a_parameter():
    m = moespec.build(REMOE)
    assert "router.l1_coeff" in m.state_dict()
    assert "router.l1_coeff" not in dict(m.named_parameters())
    assert m.router.l1_coeff.shape == () and math.isclose(m.router.l1_coeff.item(), 1e-8, rel_tol=1e-2)


def test_bad_specs(spec_error_text):
    bad = tiny(k=5)
    bad["layer"]["capacity"] = {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0}
    bad["layer"]["losses"] = {"load_balance": {"kind": "switch", "weight": 0.01}}
    msg = spec_error_text(bad)
    assert "layer.router.k" in msg and "k=5 exceeds the number of routed experts (4)" in msg
    assert "layer.capacity" in msg and "needs capacity: dropless" in msg
    assert "layer.losses.load_balance" in msg and "load-balanced L1" in msg
    assert "l1_multiplier" in spec_error_text(tiny(l1_multiplier=1.0))
    assert "l1_coeff_init" in spec_error_text(tiny(l1_coeff_init=0.0))


def test_explain_numbers():
    lay = explain_data(moespec.load_spec(REMOE))["layers"][0]
    d, f, e, k = 768, 3072, 8, 1
    expert = 3 * d * f  # SwiGLU: w_up, w_gate, w_down, no biases
    router = e * d  # the λ buffer is not a parameter
    assert lay["params_total"] == e * expert + router
    assert lay["params_active"] == k * expert + router
    assert lay["flops_per_token"] == 2 * (k * 3 * d * f + d * e)
    assert lay["experts_per_token"] == k


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_and_updates_lambda():
    """Slow-ish (dynamo): the training graph and the in-place λ update compile in one graph."""
    torch._dynamo.reset()
    spec = tiny(l1_coeff_init=0.1)
    m, ref = moespec.build(spec, seed=1).train(), moespec.build(spec, seed=1).train()
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(m.aux_loss, ref.aux_loss)
    torch.testing.assert_close(m.router.l1_coeff, ref.router.l1_coeff)
    assert m.router.l1_coeff.item() != 0.1  # the controller ran
    (y.sum() + m.aux_loss).backward()
    assert x.grad is not None and m.router.weight.grad is not None
    torch._dynamo.reset()
