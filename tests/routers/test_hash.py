"""`kind: hash` (Hash layers, Roller et al. 2021): a fixed token-id -> expert table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec import SpecError
from moespec.export.artifact import build_artifact
from moespec.reference.routers import RouteContext, route
from moespec.spec.routers.hash import hash_table

ROOT = Path(__file__).resolve().parents[2]
V = 50


def spec(n=4, d=32, *, router=None, **layer):
    r = {"kind": "hash", "vocab_size": V, **(router or {})}
    return {
        "moespec": 1,
        "name": "hash-test",
        "d_model": d,
        "layer": {
            "experts": {"routed": [{"count": n, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": r,
            "capacity": {"kind": "dropless"},
            **layer,
        },
    }


def ids(*shape, seed=0, high=V):
    return torch.randint(high, shape, generator=torch.Generator().manual_seed(seed))


def x_of(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ffn(m, e, x_TD):
    w_up, w_gate, w_down = (m.get_parameter(f"experts.0.{n}")[e] for n in ("w_up", "w_gate", "w_down"))
    return (torch.nn.functional.silu(x_TD @ w_gate.T) * (x_TD @ w_up.T)) @ w_down.T


# --- the method's invariants ------------------------------------------------------------


def test_output_is_the_hashed_experts_ffn_with_weight_one():
    m = moespec.build(spec())
    x, i = x_of(2, 9, 32), ids(2, 9)
    y = m(x, input_ids=i)
    table = m.router.table
    for t, (xt, it) in enumerate(zip(x.reshape(-1, 32), i.reshape(-1), strict=True)):
        e = int(table[it, 0])
        torch.testing.assert_close(y.reshape(-1, 32)[t], _ffn(m, e, xt[None])[0], atol=1e-5, rtol=1e-5)


def test_same_id_same_expert_whatever_the_input():
    ctx_ids = torch.tensor([3, 7, 3, 3, 7, 11])
    params = {"router.table": hash_table(V, 4, 1, "random", 0)}
    layer = moespec.load_spec(spec()).spec.layer
    for seed in range(3):
        ctx = RouteContext(4, True, inputs={"input_ids": ctx_ids})
        r = route(x_of(6, 32, seed=seed), params, layer.router, ctx)
        idx = r.topk_idx_TK[:, 0]
        assert idx[0] == idx[2] == idx[3] and idx[1] == idx[4]
        assert torch.equal(idx, params["router.table"][ctx_ids, 0])
        assert torch.all(r.topk_weight_TK == 1.0)
        assert torch.all(r.logits_TE == 0) and torch.equal(r.probs_TE.sum(-1), torch.ones(6))


def test_table_is_a_function_of_the_spec_only():
    a = moespec.build(spec(), seed=1).state_dict()["router.table"]
    b = moespec.build(spec(), seed=2).state_dict()["router.table"]
    c = moespec.build(spec(router={"seed": 5}), seed=1).state_dict()["router.table"]
    assert a.dtype == torch.int64 and a.shape == (V, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 4 and len(a.unique()) == 4


def test_modulo_and_multi_hash_tables():
    t = hash_table(10, 4, 1, "modulo", 0)
    assert t[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    t2 = hash_table(10, 4, 2, "modulo", 0)
    assert t2.tolist()[3] == [3, 0]
    r = hash_table(200, 8, 3, "random", 1)
    assert r.shape == (200, 3)
    # k > 1: k distinct experts per id.
    assert all(len(set(row)) == 3 for row in r.tolist())


def test_k2_weights_are_one_half():
    m = moespec.build(spec(router={"k": 2}))
    x, i = x_of(5, 32), ids(5)
    y = m(x, input_ids=i)
    for t in range(5):
        e0, e1 = m.router.table[i[t]].tolist()
        want = 0.5 * (_ffn(m, e0, x[t : t + 1]) + _ffn(m, e1, x[t : t + 1]))
        torch.testing.assert_close(y[t : t + 1], want, atol=1e-5, rtol=1e-5)
    assert m.routing_stats["routed_per_expert"].sum() == 10


def test_table_in_state_dict_is_used_after_load_state_dict():
    m = moespec.build(spec())
    sd = m.state_dict()
    assert "router.table" in sd and not any(n.startswith("router.") for n, _ in m.named_parameters())
    sd["router.table"] = torch.full((V, 1), 2, dtype=torch.int64)  # e.g. a balanced assignment
    m.load_state_dict(sd)
    m(x_of(6, 32), input_ids=ids(6))
    assert m.routing_stats["routed_per_expert"].tolist() == [0, 0, 6, 0]


def test_table_survives_artifact_save_and_load(tmp_path):
    out = tmp_path / "art"
    build_artifact(spec(), out, seed=3)
    built, loaded = moespec.build(spec(), seed=3), moespec.load(out)
    assert loaded.state_dict()["router.table"].dtype == torch.int64
    assert torch.equal(built.state_dict()["router.table"], loaded.state_dict()["router.table"])
    built.eval(), loaded.eval()
    x, i = x_of(2, 5, 32), ids(2, 5)
    with torch.no_grad():
        assert torch.equal(built(x, input_ids=i), loaded(x, input_ids=i))


def test_table_stays_int64_in_bf16():
    m = moespec.build({**spec(), "target": {"dtype": "bf16"}})
    assert m.router.table.dtype == torch.int64
    m = moespec.build(spec()).to(torch.bfloat16)
    assert m.router.table.dtype == torch.int64
    m(x_of(4, 32).bfloat16(), input_ids=ids(4))


# --- input errors -------------------------------------------------------------------------


def test_missing_input_ids_is_a_clear_error():
    m = moespec.build(spec())
    with pytest.raises(TypeError, match=r"needs `input_ids` of shape \(2, 3\)"):
        m(x_of(2, 3, 32))


def test_wrong_shape_input_ids_is_a_clear_error():
    m = moespec.build(spec())
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(2, 3\)"):
        m(x_of(2, 3, 32), input_ids=ids(5))
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(2, 3\)"):
        m(x_of(2, 3, 32), input_ids=ids(3, 2))


def test_float_ids_are_rejected():
    m = moespec.build(spec())
    with pytest.raises(TypeError, match=r"integer|int32 or int64"):
        m(x_of(3, 32), input_ids=torch.zeros(3))


def test_out_of_range_ids_raise_not_clamp():
    m = moespec.build(spec())
    with pytest.raises(IndexError):
        m(x_of(3, 32), input_ids=torch.tensor([0, V, 1]))
    with pytest.raises(IndexError):
        m(x_of(3, 32), input_ids=torch.tensor([0, -1, 1]))


def test_reference_needs_input_ids():
    layer = moespec.load_spec(spec()).spec.layer
    params = {"router.table": hash_table(V, 4, 1, "random", 0)}
    with pytest.raises(ValueError, match="input_ids"):
        route(x_of(3, 32), params, layer.router, RouteContext(4, True))


# --- module == reference --------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "router", [{}, {"k": 2}, {"hash": "modulo"}, {"hash": "modulo", "k": 3, "vocab_size": 7}]
)
def test_module_matches_reference(compare, router, training):
    x = x_of(2, 7, 32, seed=1)
    i = ids(2, 7, seed=2, high=router.get("vocab_size", V))
    compare(spec(router=router), (), x, training=training, inputs={"input_ids": i})


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d", [48, 100])
def test_odd_shapes(compare, t, d):
    compare(spec(d=d), (), x_of(t, d), training=True, inputs={"input_ids": ids(t, seed=t)})


def test_all_tokens_on_one_expert_and_capacity(compare):
    x = x_of(16, 32)
    same = torch.full((16,), 7)
    m, _ = compare(spec(), (), x, training=True, inputs={"input_ids": same})
    routed = m.routing_stats["routed_per_expert"]
    assert routed.max() == 16 and (routed == 0).sum() == 3
    cap = {"capacity": {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0, "min_capacity": 1}}
    m, _ = compare(spec(**cap), (), x, training=True, inputs={"input_ids": same})
    assert m.routing_stats["tokens_per_expert"].max() == 4  # C = 16 * 1 / 4
    torch.testing.assert_close(m.routing_stats["dropped_fraction"], torch.tensor(0.75))


def test_compile_fullgraph_and_export():
    m = moespec.build(spec(router={"k": 2}))
    x, i = x_of(6, 32), ids(6)
    y = torch.compile(m, fullgraph=True, backend="eager")(x, input_ids=i)
    torch.testing.assert_close(y, m(x, input_ids=i))
    m.eval()
    ep = torch.export.export(m, (x,), {"input_ids": i})
    torch.testing.assert_close(ep.module()(x, input_ids=ids(6, seed=1)), m(x, input_ids=ids(6, seed=1)))


# --- spec checks and numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "router", "message"),
    [
        ({}, {"k": 5}, "k=5 exceeds the number of routed experts (4)"),
        ({"losses": {"load_balance": {"kind": "switch", "weight": 0.01}}}, {}, "no router to balance"),
        ({"losses": {"z_loss": {"weight": 0.01}}}, {}, "no router logits"),
    ],
)
def test_bad_specs(layer, router, message):
    with pytest.raises(SpecError) as ei:
        moespec.load_spec(spec(router=router, **layer))
    assert message in str(ei.value)


def test_vocab_size_required():
    bad = spec()
    del bad["layer"]["router"]["vocab_size"]
    with pytest.raises(SpecError, match="vocab_size"):
        moespec.load_spec(bad)


def test_explain_numbers_of_the_example_spec(explain_layer):
    layer = explain_layer(ROOT / "specs/hash-layers.yaml")
    d, f, e = 1024, 4096, 64
    expert = 2 * d * f + f + d  # w_up, w_down and their biases
    assert layer["params_total"] == e * expert  # no router parameters (the table is a buffer)
    assert layer["params_active"] == expert
    assert layer["flops_per_token"] == 2 * 2 * d * f  # no router GEMM
