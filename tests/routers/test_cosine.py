"""`kind: cosine` (X-MoE, Chi et al. 2022): cosine scores on a low-dimensional projection."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec import SpecError
from moespec.reference.routers import RouteContext, route

ROOT = Path(__file__).resolve().parents[2]


def spec(n=4, d=32, *, router=None, **layer):
    return {
        "moespec": 1,
        "name": "cosine-test",
        "d_model": d,
        "layer": {
            "experts": {"routed": [{"count": n, "kind": "glu", "activation": "silu", "d_ff": 16}]},
            "router": {"kind": "cosine", "k": 2, **(router or {})},
            "capacity": {"kind": "dropless"},
            **layer,
        },
    }


def x_of(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _route(m, x, router=None, training=True):
    layer = moespec.load_spec(spec(router=router)).spec.layer
    params = {k: v.detach() for k, v in m.state_dict().items()}
    return route(x, params, layer.router, RouteContext(4, training))


# --- the method's invariants ------------------------------------------------------------


def test_logits_are_cosines_over_tau():
    m = moespec.build(spec())
    x = x_of(9, 32)
    r = _route(m, x)
    assert r.logits_TE.abs().max() <= 1 / 0.07 + 1e-4
    h = torch.nn.functional.normalize(x @ m.router.proj.detach().T, dim=-1)
    e = torch.nn.functional.normalize(m.router.expert_emb.detach(), dim=-1)
    torch.testing.assert_close(r.logits_TE, (h @ e.T) / 0.07)
    torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(9))
    torch.testing.assert_close(r.topk_weight_TK, r.probs_TE.gather(1, r.topk_idx_TK))


def test_token_scale_invariance_and_torchscale_form():
    m = moespec.build(spec())
    x = x_of(5, 32)
    torch.testing.assert_close(_route(m, x).logits_TE, _route(m, 3.0 * x).logits_TE)
    # torchscale: no token normalisation, no temperature -> scales with the token.
    ts = {"normalize_tokens": False, "temperature": 1.0}
    torch.testing.assert_close(_route(m, 3.0 * x, ts).logits_TE, 3.0 * _route(m, x, ts).logits_TE)


def test_expert_embedding_norm_does_not_change_the_layer():
    """torchscale rescales e to norm 1.5 before each forward; the scores cannot see it."""
    m = moespec.build(spec())
    x = x_of(7, 32)
    y1 = m(x)
    with torch.no_grad():
        m.router.expert_emb.mul_(1.5 / m.router.expert_emb.norm(dim=1, keepdim=True))
    torch.testing.assert_close(m(x), y1)


def test_expert_embeddings_start_orthogonal_with_gain_032():
    emb = moespec.build(spec(d=32, router={"proj_dim": 8})).router.expert_emb.detach()
    assert emb.shape == (4, 8)
    torch.testing.assert_close(emb @ emb.T, 0.32**2 * torch.eye(4), atol=1e-6, rtol=0)


def test_learnable_temperature_starts_at_tau_and_gets_a_gradient():
    m = moespec.build(spec(router={"learnable_temperature": True, "temperature": 0.3}))
    assert m.router.log_temperature.shape == (1,)
    torch.testing.assert_close(m.router.log_temperature.exp(), torch.tensor([0.3]))
    m(x_of(6, 32)).square().sum().backward()
    assert m.router.log_temperature.grad.abs().item() > 0
    # Clamped at tau >= 0.01 (Tutel): below the floor the logits stop growing.
    with torch.no_grad():
        m.router.log_temperature.fill_(math.log(1e-4))
    m(x_of(6, 32))
    assert m.router_logits.abs().max() <= 100 + 1e-3


def test_top1_is_argmax_of_cosine():
    m = moespec.build(spec(router={"k": 1}))
    x = x_of(11, 32)
    r = _route(m, x, {"k": 1})
    assert torch.equal(r.topk_idx_TK[:, 0], r.logits_TE.argmax(-1))


# --- module == reference --------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("router", "layer"),
    [
        ({}, {}),
        (
            {"k": 1, "learnable_temperature": True},
            {"losses": {"load_balance": {"kind": "gshard", "weight": 0.01}}},
        ),
        ({"renormalize": True, "normalize_tokens": False, "temperature": 1.0}, {}),
        (
            {"proj_dim": 5, "temperature": 0.2},
            {
                "losses": {"load_balance": {"kind": "switch", "weight": 0.1}, "z_loss": {"weight": 0.01}},
                "capacity": {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.5, "min_capacity": 1},
            },
        ),
    ],
)
def test_module_matches_reference(compare, router, layer, training):
    compare(spec(router=router, **layer), (), x_of(2, 7, 32, seed=1), training=training)


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d", [48, 100])
def test_odd_shapes(compare, t, d):
    compare(spec(d=d, router={"learnable_temperature": True}), (), x_of(t, d, seed=t), training=True)


def test_fp64(compare):
    s = {**spec(), "target": {"dtype": "fp64", "router_dtype": "fp64"}}
    compare(s, (), x_of(7, 32).double(), training=True, atol=1e-10, rtol=1e-10)


def test_all_tokens_on_one_expert(run_both):
    """Tokens all along one direction pick the same expert; the others stay empty."""
    x = x_of(1, 32).expand(16, 32) * torch.linspace(0.5, 2, 16)[:, None]
    m, _, (_, y1, _), (_, y2, _, _) = run_both(spec(router={"k": 1}), (), x.contiguous(), training=True)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
    assert sorted(m.routing_stats["routed_per_expert"].tolist()) == [0, 0, 0, 16]


def test_compile_fullgraph_and_export():
    m = moespec.build(spec(router={"learnable_temperature": True}))
    x = x_of(6, 32)
    y = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(y, m(x))
    m.eval()
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(2 * x), m(2 * x))


# --- spec checks and numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "router", "message"),
    [
        ({}, {"k": 5}, "k=5 exceeds the number of routed experts (4)"),
        (
            {
                "losses": {
                    "load_balance": {
                        "kind": "importance_load_cv2",
                        "importance_weight": 0.1,
                        "load_weight": 0.1,
                    }
                }
            },
            {},
            "importance_load_cv2 needs noisy logits",
        ),
        ({}, {"learnable_temperature": True, "temperature": 0.001}, "at or above its floor 0.01"),
    ],
)
def test_bad_specs(layer, router, message):
    with pytest.raises(SpecError) as ei:
        moespec.load_spec(spec(router=router, **layer))
    assert message in str(ei.value)


def test_explain_numbers_of_the_example_spec(explain_layer):
    layer = explain_layer(ROOT / "specs/x-moe.yaml")
    d, f, e, p = 768, 3072, 32, 16
    expert = 2 * d * f + f + d  # GELU MLP with biases
    router = d * p + e * p  # router.proj + router.expert_emb
    assert layer["params_total"] == e * expert + router
    assert layer["params_active"] == expert + router
    assert layer["flops_per_token"] == 2 * (d * p + p * e + 2 * d * f)
