"""`kind: expert_choice` (Zhou et al. 2022, arXiv:2202.09368): spec checks, the defining
invariants on the reference and the built module, the fused selection op against the
reference, module == reference (forward, aux loss, gradients), and the example's numbers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import moespec
from moespec.ops.expert_choice import expert_choice_select
from moespec.reference import moe_layer_reference
from moespec.reference.routers import RouteContext, route
from moespec.reference.routers.expert_choice import (
    expert_choice_capacity,
    expert_choice_selection,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "expert-choice.yaml"

BASE = {
    "moespec": 1,
    "name": "ec-test",
    "d_model": 48,
    "layer": {
        "experts": {"routed": [{"count": 4, "kind": "glu", "activation": "silu", "d_ff": 16}]},
        "router": {"kind": "expert_choice", "capacity_factor": 2.0, "min_capacity": 1},
        "capacity": {"kind": "dropless"},
        "losses": {"z_loss": {"weight": 0.01}},
    },
}


def spec(d_model: int = 48, n_experts: int = 4, **router) -> dict:
    s = copy.deepcopy(BASE)
    s["d_model"] = d_model
    s["layer"]["experts"]["routed"][0]["count"] = n_experts
    s["layer"]["router"].update(router)
    return s


def randn(*shape: int, seed: int = 0, dtype=torch.float32, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def reference_routing(s: dict, x: torch.Tensor, training: bool = True, seed: int = 3):
    """(module, routing result of the reference router on the module's parameters)."""
    m = moespec.build(s, seed=seed)
    layer = moespec.load_spec(s).spec.layer
    params = dict(m.state_dict())
    ctx = RouteContext(layer.experts.n_routed, training)
    return m, route(x, params, layer.router, ctx)


# --- capacity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "e", "cf", "min_c", "expected"),
    [
        (64, 4, 2.0, 4, 32),  # 2·64/4
        (7, 4, 2.0, 1, 4),  # round(3.5) = 4 (half to even)
        (10, 4, 1.0, 0, 2),  # round(2.5) = 2 (half to even, Python's round as flaxformer)
        (6, 4, 1.0, 0, 2),  # round(1.5) = 2
        (7, 4, 0.2, 0, 0),  # round(0.35) = 0: no expert takes a token
        (7, 4, 0.2, 3, 3),  # min_capacity
        (1, 4, 2.0, 4, 1),  # capped at T
        (5, 2, 8.0, 0, 5),  # cf·T/E > T: every token
        (0, 4, 2.0, 4, 0),
    ],
)
def test_capacity_rounding(t, e, cf, min_c, expected):
    assert expert_choice_capacity(t, e, cf, min_c) == expected


# --- the defining invariants (reference router) ---------------------------------------------


@pytest.mark.parametrize("t", [1, 7, 64])
def test_every_expert_takes_exactly_c_tokens(t: int):
    s = spec(n_experts=4, capacity_factor=2.0, min_capacity=1)
    _, r = reference_routing(s, randn(t, 48))
    c = expert_choice_capacity(t, 4, 2.0, 1)
    sel = r.selected_TE()
    assert sel.sum(0).tolist() == [c] * 4
    assert int(sel.sum()) == 4 * c


def test_weights_are_the_softmax_scores_and_tokens_get_0_to_e_experts():
    s = spec(n_experts=4, capacity_factor=1.0, min_capacity=0)
    x = randn(64, 48)
    m, r = reference_routing(s, x)
    probs = (x @ m.state_dict()["router.weight"].T).softmax(-1)
    torch.testing.assert_close(r.probs_TE, probs)
    sel = r.selected_TE()
    gates = r.gates_TE()
    torch.testing.assert_close(gates, torch.where(sel, probs, torch.zeros_like(probs)))
    per_token = sel.sum(1)
    assert per_token.min() == 0 and per_token.max() >= 2  # uneven by design
    assert int(per_token.sum()) == 4 * 16
    # Each expert's chosen tokens are its highest-scoring ones.
    for e in range(4):
        chosen, rest = probs[sel[:, e], e], probs[~sel[:, e], e]
        assert chosen.min() >= rest.max()


def test_token_with_no_expert_gets_zero_routed_output():
    s = spec(n_experts=4, capacity_factor=1.0, min_capacity=0)
    x = randn(64, 48)
    m, r = reference_routing(s, x)
    none_T = r.selected_TE().sum(1) == 0
    assert none_T.any()
    y = m.eval()(x)
    assert torch.all(y[none_T] == 0) and torch.all(y[~none_T].abs().sum(-1) > 0)


def test_ties_go_to_the_lower_token_index():
    scores = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    # C = round(1.0·5/2) = 2: expert 0 takes token 1 then the first tie (token 0);
    # expert 1 takes token 4 then token 0.
    want = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.bool)
    assert torch.equal(expert_choice_selection(scores, 1.0, 0, None), want)
    assert torch.equal(expert_choice_select(scores, 1.0, 0, 0), want)


def test_identical_tokens_fill_experts_in_token_order():
    # Padding-like identical tokens: every score ties; each expert takes the first C tokens.
    x = torch.zeros(9, 48)
    _, r = reference_routing(spec(capacity_factor=2.0, min_capacity=0), x)
    c = expert_choice_capacity(9, 4, 2.0, 0)
    assert torch.equal(r.selected_TE(), (torch.arange(9) < c)[:, None].expand(9, 4))


def test_one_token_goes_to_every_expert():
    _, r = reference_routing(spec(capacity_factor=2.0, min_capacity=1), randn(1, 48))
    assert r.selected_TE().all()


def test_capacity_at_least_t_takes_every_token():
    _, r = reference_routing(spec(capacity_factor=4.0, min_capacity=0), randn(7, 48))
    assert r.selected_TE().all()
    torch.testing.assert_close(r.gates_TE(), r.probs_TE)


def test_groups_route_separately():
    scores = randn(11, 4).softmax(-1)
    sel = expert_choice_selection(scores, 2.0, 0, 4)  # groups of 4, 4, 3 tokens
    for lo, hi in ((0, 4), (4, 8), (8, 11)):
        c = expert_choice_capacity(hi - lo, 4, 2.0, 0)
        assert sel[lo:hi].sum(0).tolist() == [c] * 4
        assert torch.equal(sel[lo:hi], expert_choice_selection(scores[lo:hi], 2.0, 0, None))


def test_eval_capacity_factor():
    s = spec(capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    x = randn(16, 48)
    _, r_train = reference_routing(s, x, training=True)
    _, r_eval = reference_routing(s, x, training=False)
    assert r_train.selected_TE().sum(0).tolist() == [4] * 4
    assert r_eval.selected_TE().sum(0).tolist() == [8] * 4


# --- the fused op --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "e", "cf", "min_c", "group"),
    [(1, 4, 2.0, 1, 0), (7, 4, 2.0, 0, 0), (64, 8, 1.0, 4, 0), (64, 8, 2.0, 0, 16), (50, 3, 1.5, 2, 16),
     (9, 4, 0.2, 0, 0), (9, 4, 9.0, 0, 4), (0, 4, 2.0, 4, 0), (5, 4, 2.0, 0, 7)],
)  # fmt: skip
def test_op_matches_reference(t, e, cf, min_c, group):
    for seed in range(3):
        scores = randn(t, e, seed=seed).softmax(-1)
        # Coarsely quantised scores tie often: the tie order must agree too.
        for s in (scores, (scores * 4).round() / 4):
            want = expert_choice_selection(s, cf, min_c, group or None)
            assert torch.equal(expert_choice_select(s, cf, min_c, group), want)


@pytest.mark.parametrize("args", [(2.0, 1, 0), (1.0, 0, 3), (9.0, 0, 0)])
def test_opcheck(args):
    a = (randn(7, 4).softmax(-1), *args)
    result = torch.library.opcheck(torch.ops.moespec.expert_choice_select.default, a)
    assert all(v == "SUCCESS" for v in result.values()), result


# --- module == reference -------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d_model", [48, 100])
def test_module_matches_reference(compare, training: bool, t: int, d_model: int):
    x = randn(t, d_model, seed=t)
    _, stats = compare(spec(d_model=d_model), (), x, training=training)
    c = expert_choice_capacity(t, 4, 2.0, 1)
    assert stats.routed_per_expert.tolist() == [c] * 4


@pytest.mark.parametrize(
    "router",
    [
        {"bias": True},
        {"group_size": 3},
        {"capacity_factor": 1.0, "eval_capacity_factor": 3.0, "min_capacity": 0},
        {"capacity_factor": 0.2, "min_capacity": 0},  # C = 0: no expert takes a token
        {"capacity_factor": 4.0},  # C = T: every token on every expert
        {"dtype": "fp64"},
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_module_matches_reference_options(compare, router: dict, training: bool):
    compare(spec(**router), (), randn(7, 48, seed=1), training=training)


def test_module_matches_reference_batched_per_sequence_groups(compare):
    # [B, S, D] input with group_size = S: per-sequence routing.
    compare(spec(group_size=5), (), randn(3, 5, 48), training=True)


def test_module_matches_reference_fp64(compare):
    s = spec()
    s["target"] = {"dtype": "fp64", "router_dtype": "fp64"}
    compare(s, (), randn(7, 48, dtype=torch.float64), training=True, atol=1e-10, rtol=1e-10)


def test_module_with_shared_expert(compare):
    s = spec(capacity_factor=1.0, min_capacity=0)
    s["layer"]["experts"]["shared"] = {"kind": "glu", "activation": "silu", "d_ff": 16}
    compare(s, (), randn(7, 48), training=True)


def test_all_tokens_prefer_one_expert_still_balanced():
    # A router that sends every token's top score to expert 0: token choice would put all
    # tokens on it; expert choice still gives every expert exactly C tokens.
    m = moespec.build(spec(capacity_factor=1.0, min_capacity=0))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 5.0
    x = randn(16, 48).abs() + 0.1
    m.train()(x)
    assert m.routing_stats["routed_per_expert"].tolist() == [4] * 4
    assert float(m.routing_stats["load_ratio"]) == 1.0
    layer = moespec.load_spec(spec(capacity_factor=1.0, min_capacity=0)).spec.layer
    params = {k: v.detach() for k, v in m.state_dict().items()}
    y_ref, _, _ = moe_layer_reference(x, params, layer, 48, training=True)
    torch.testing.assert_close(m(x), y_ref, atol=1e-5, rtol=1e-4)


def test_z_loss_is_the_only_aux_loss():
    s = spec()
    m = moespec.build(s).train()
    x = randn(7, 48)
    m(x)
    z = torch.logsumexp(m.router_logits, -1).pow(2).mean() * 0.01
    torch.testing.assert_close(m.aux_loss, z)
    s["layer"]["losses"] = {}
    m2 = moespec.build(s).train()
    m2(x)
    assert float(m2.aux_loss) == 0.0


def test_export_with_dynamic_tokens():
    m = moespec.build(spec()).eval()
    dim = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(m, (randn(9, 48),), dynamic_shapes={"x": {0: dim}})
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "moespec.expert_choice_select.default" in ops
    for t in (2, 33):
        x = randn(t, 48, seed=t)
        torch.testing.assert_close(ep.module()(x), m(x))


# --- spec checks ---------------------------------------------------------------------------


def test_autoregressive_is_an_error(spec_diagnostics):
    s = spec(autoregressive=True)
    ((path, msg),) = spec_diagnostics(s)
    assert path == "layer.router.autoregressive"
    assert "later tokens" in msg and "causal decoder" in msg


def test_router_is_not_causal():
    assert moespec.load_spec(spec()).spec.layer.router.causal is False


def test_capacity_must_be_dropless(spec_diagnostics):
    s = spec()
    s["layer"]["capacity"] = {"kind": "factor", "train_factor": 1.25, "eval_factor": 2.0}
    ((path, msg),) = spec_diagnostics(s)
    assert path == "layer.capacity" and "must be `dropless`" in msg


def test_load_balance_loss_is_an_error(spec_diagnostics):
    s = spec()
    s["layer"]["losses"]["load_balance"] = {"kind": "switch", "weight": 0.01}
    ((path, msg),) = spec_diagnostics(s)
    assert path == "layer.losses.load_balance" and "balanced by construction" in msg


def test_all_problems_reported_at_once(spec_diagnostics):
    s = spec(autoregressive=True)
    s["layer"]["capacity"] = {"kind": "factor", "train_factor": 1.25, "eval_factor": 2.0}
    s["layer"]["losses"]["load_balance"] = {"kind": "switch", "weight": 0.01}
    assert len(spec_diagnostics(s)) == 3


@pytest.mark.parametrize(
    ("field", "value"), [("capacity_factor", 0), ("min_capacity", -1), ("group_size", 0), ("k", 2)]
)
def test_bad_fields(field: str, value, spec_diagnostics):
    ((path, _),) = spec_diagnostics(spec(**{field: value}))
    assert path.startswith("layer.router")


# --- the example spec's numbers ------------------------------------------------------------


def test_example_spec_numbers(explain_layer):
    layer = explain_layer(SPEC)
    d, f, e, cf = 4096, 16384, 64, 2.0  # paper Table 1, 8B/64E; EC-CF2
    expert = 2 * d * f  # w_up + w_down, no biases
    router = d * e
    assert layer["experts_per_token"] == cf
    assert layer["params_total"] == e * expert + router
    assert layer["params_active"] == router + cf * expert
    assert layer["flops_per_token"] == 2 * (router + cf * expert)
    assert moespec.load_spec(SPEC).spec.layer.router.rows_per_token(moespec.load_spec(SPEC).spec.layer) == e


def test_module_with_zero_compute_experts(compare):
    # MoE++ copy/constant experts choose their top-C tokens like the FFN experts.
    s = spec()
    s["layer"]["experts"]["zero_compute"] = [{"kind": "copy", "count": 1}, {"kind": "constant", "count": 1}]
    _, stats = compare(s, (), randn(7, 48), training=True)
    assert stats.routed_per_expert.tolist() == [expert_choice_capacity(7, 6, 2.0, 1)] * 6


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager(training: bool):
    torch._dynamo.reset()
    m = moespec.build(spec(group_size=4)).train(training)
    x = randn(2, 7, 48, requires_grad=True)
    y = torch.compile(m, fullgraph=True, backend="eager")(x)
    aux = m.aux_loss
    torch.testing.assert_close(y, m(x))
    torch.testing.assert_close(aux, m.aux_loss)
    (y.sum() + aux).backward()
    assert x.grad is not None and m.router.weight.grad is not None
    torch._dynamo.reset()
