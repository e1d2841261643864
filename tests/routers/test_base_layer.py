"""`kind: base` (BASE layers, Lewis et al. 2021): the exact balanced-assignment op, the
reference's invariants, module vs reference, bad specs and the example spec's numbers."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import moespec
from moespec.ops.balanced_assignment import expert_capacities, solve_balanced_assignment
from moespec.reference import moe_layer_reference
from moespec.reference.experts import expert_forward
from moespec.reference.routers import RouteContext, route

ROOT = Path(__file__).resolve().parents[2]


def spec(d_model: int = 48, experts: int = 4, **router) -> dict:
    return {
        "moespec": 1,
        "name": "base-test",
        "d_model": d_model,
        "layer": {
            "experts": {"routed": [{"count": experts, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": {"kind": "base", **router},
            "capacity": {"kind": "dropless"},
        },
    }


def brute_force_best(a_TE: torch.Tensor) -> float:
    """The best total affinity over every assignment with the op's expert capacities."""
    n_tok, n_exp = a_TE.shape
    cap = expert_capacities(n_tok, n_exp).tolist()
    best = -float("inf")
    for combo in itertools.product(range(n_exp), repeat=n_tok):
        if [combo.count(e) for e in range(n_exp)] == cap:
            best = max(best, sum(float(a_TE[t, e]) for t, e in enumerate(combo)))
    return best


def route_ref(x_TD, centroids_ED, training, **router):
    layer = moespec.load_spec(spec(x_TD.shape[1], centroids_ED.shape[0], **router)).spec.layer
    ctx = RouteContext(centroids_ED.shape[0], training)
    return route(x_TD, {"router.centroids": centroids_ED}, layer.router, ctx)


# --- the solver ---------------------------------------------------------------------------


@pytest.mark.parametrize("t,e", [(6, 3), (7, 3), (6, 4), (8, 2), (5, 2), (2, 4), (1, 3), (6, 1)])
def test_assignment_is_balanced_and_optimal(t, e):
    gen = torch.Generator().manual_seed(10 * t + e)
    for trial in range(4):
        a = torch.randn(t, e, generator=gen, dtype=torch.float64)
        if trial == 1:
            a[:, 0] += 5.0  # every token prefers expert 0
        if trial == 2:
            a = a.round()  # many ties
        idx = solve_balanced_assignment(a)
        assert torch.bincount(idx, minlength=e).tolist() == expert_capacities(t, e).tolist()
        got = float(a.gather(1, idx[:, None]).sum())
        assert got == pytest.approx(brute_force_best(a), abs=1e-9)


def test_capacities_when_experts_do_not_divide_tokens():
    assert expert_capacities(8, 4).tolist() == [2, 2, 2, 2]
    assert expert_capacities(7, 3).tolist() == [3, 2, 2]
    assert expert_capacities(2, 4).tolist() == [1, 1, 0, 0]


def test_assignment_deterministic_fp32_and_nonfinite():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 8, generator=gen)
    first = solve_balanced_assignment(a)
    assert torch.equal(first, solve_balanced_assignment(a.clone()))
    assert first.dtype == torch.int64 and (torch.bincount(first, minlength=8) == 8).all()
    a[3, 2], a[5, 0] = float("nan"), float("inf")
    idx = solve_balanced_assignment(a)
    assert (torch.bincount(idx, minlength=8) == 8).all()
    assert solve_balanced_assignment(torch.empty(0, 4)).shape == (0,)


def test_assignment_beats_greedy_on_a_skewed_problem():
    # All tokens prefer expert 0: the balanced optimum keeps the 2 strongest there.
    a = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.4]])
    assert solve_balanced_assignment(a).tolist() == [0, 0, 1, 1]


def test_custom_op_opcheck():
    a = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    # The fake-tensor check (no autograd: the output is integer). test_schema re-dispatches
    # every small op of the iterative solver under a checking mode: seconds, so skipped.
    torch.library.opcheck(torch.ops.moespec.balanced_assignment, (a,), test_utils=("test_faketensor",))
    assert torch.equal(torch.ops.moespec.balanced_assignment(a), solve_balanced_assignment(a))


# --- the reference's invariants ------------------------------------------------------------


def test_training_every_expert_gets_t_over_e_and_eval_is_argmax():
    gen = torch.Generator().manual_seed(3)
    x, c = torch.randn(32, 48, generator=gen), torch.randn(4, 48, generator=gen)
    c[0] += 3.0 * x.mean(0)  # skew: greedy would overload expert 0
    train = route_ref(x, c, True)
    assert train.tokens_per_expert().tolist() == [8, 8, 8, 8]
    ev = route_ref(x, c, False)
    assert torch.equal(ev.topk_idx_TK[:, 0], (x @ c.T).argmax(1))
    assert ev.tokens_per_expert().tolist() != [8, 8, 8, 8]
    for r in (train, ev):
        a = x @ c.T
        alpha = torch.sigmoid(a.gather(1, r.topk_idx_TK))
        torch.testing.assert_close(r.topk_weight_TK, alpha)
        torch.testing.assert_close(r.residual_TD, (1 - alpha) * x)


def test_centroid_gradient_flows_through_alpha_only():
    gen = torch.Generator().manual_seed(4)
    s = spec()
    layer = moespec.load_spec(s).spec.layer
    m = moespec.build(s, seed=5)
    params = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params["router.centroids"].requires_grad_()
    x = torch.randn(12, 48, generator=gen)
    probe = torch.randn(12, 48, generator=gen)
    y, _, stats = moe_layer_reference(x, params, layer, 48, training=True)
    (y * probe).sum().backward()
    # The same loss with the assignment frozen and α = σ(x·c_e) the only path to C.
    c = params["router.centroids"].detach().clone().requires_grad_()
    idx = stats.routing.topk_idx_TK[:, 0]
    alpha = torch.sigmoid((x * c[idx]).sum(1, keepdim=True))
    f = torch.stack(
        [expert_forward(int(e), x[t : t + 1], params, layer.experts)[0] for t, e in enumerate(idx)]
    )
    ((alpha * f + (1 - alpha) * x) * probe).sum().backward()
    torch.testing.assert_close(params["router.centroids"].grad, c.grad)
    assert c.grad.abs().sum() > 0


def test_mix_residual_false_drops_the_residual(run_both):
    x = torch.randn(10, 48, generator=torch.Generator().manual_seed(6))
    _, _, (_, y_mix, _), (_, _, _, st) = run_both(spec(), (), x, training=True)
    _, _, (_, y_nomix, _), _ = run_both(spec(mix_residual=False), (), x, training=True)
    alpha = st.routing.topk_weight_TK.detach()
    torch.testing.assert_close(y_mix - y_nomix, (1 - alpha) * x, atol=1e-5, rtol=1e-4)


# --- module vs reference ---------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t,d", [(1, 48), (7, 100), (64, 48)])
def test_module_matches_reference(compare, t, d, training):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t + d))
    m, stats = compare(spec(d), (), x, training=training)
    if training:
        want = expert_capacities(t, 4).tolist()
        assert m.routing_stats["tokens_per_expert"].tolist() == want
        assert stats.tokens_per_expert.tolist() == want


def test_module_all_tokens_alike(compare):
    # Identical tokens: eval puts all on one expert; training still splits them evenly.
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(7)).expand(8, 48).contiguous()
    m, _ = compare(spec(), (), x, training=False)
    assert sorted(m.routing_stats["tokens_per_expert"].tolist()) == [0, 0, 0, 8]
    m, _ = compare(spec(), (), x, training=True)
    assert m.routing_stats["tokens_per_expert"].tolist() == [2, 2, 2, 2]


def test_module_fp64_and_3d_input(compare):
    s = spec()
    s["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    compare(s, (), x, training=True, atol=1e-10, rtol=1e-10)


def test_module_centroid_init_is_orthogonal_with_gain():
    m = moespec.build(spec(), seed=0)
    c = m.state_dict()["router.centroids"]
    torch.testing.assert_close(c @ c.T, 0.01 * torch.eye(4), atol=1e-6, rtol=0)


# --- specs -----------------------------------------------------------------------------------


def test_bad_specs():
    s = spec()
    s["layer"]["losses"] = {"load_balance": {"kind": "switch", "weight": 0.01}}
    with pytest.raises(moespec.SpecError) as ei:
        moespec.load_spec(s)
    (d,) = ei.value.diagnostics
    assert "balanced by construction" in d.message and "load_balance" in str(d.format())
    with pytest.raises(moespec.SpecError, match="centroid_gain"):
        moespec.load_spec(spec(centroid_gain=0))
    with pytest.raises(moespec.SpecError, match="unknown key"):
        moespec.load_spec(spec(k=2))


def test_example_spec_numbers(explain_layer):
    lay = explain_layer(ROOT / "specs/base-layers.yaml")
    d, e, f = 2048, 128, 8192
    expert = 2 * d * f + f + d  # ReLU MLP with biases
    router = e * d  # centroids
    assert lay["params_total"] == e * expert + router
    assert lay["params_active"] == expert + router
    assert lay["flops_per_token"] == 2 * (d * e + 2 * d * f)
