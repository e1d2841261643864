"""Multi-head MoE (MH-MoE): sub-token split and merge around an unchanged MoE layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"
MH = str(SPECS / "mh-moe.yaml")
TINY = str(SPECS / "debug-tiny.yaml")
SMALL = ("d_model=48", "layer.experts.routed.0.count=6", "layer.experts.routed.0.d_ff=20")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_module_matches_reference(compare, t, training):
    x = torch.randn(t, 48, generator=torch.Generator().manual_seed(t))
    compare(MH, SMALL, x, training=training)


@pytest.mark.parametrize(
    "over",
    [
        ("layer.multi_head={heads: 2, bias: false}", "layer.losses.load_balance.scope=sequence"),
        ("layer.multi_head.heads=3", "layer.capacity={kind: factor, train_factor: 1.0, eval_factor: 1.0}"),
        ("layer.experts.shared={count: 1, kind: glu, activation: silu, d_ff: 8}",),
    ],
)
def test_variants_match_reference(compare, over):
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    compare(MH, (*SMALL, *over), x, training=True)


def test_sub_tokens_are_routed_independently():
    m = moespec.build(MH, SMALL).eval()
    m(torch.randn(5, 48))
    assert m.router_logits.shape == (5 * 4, 6)  # one routing per sub-token
    assert int(m.routing_stats["routed_per_expert"].sum()) == 5 * 4 * 2


def test_equals_manual_split_through_a_plain_layer():
    """MH-MoE == W_out · merge(plain MoE at width D/h on split(W_in x)) with the same weights."""
    mh = moespec.build(MH, SMALL, seed=5).eval()
    plain = moespec.build(MH, (*SMALL, "~layer.multi_head", "d_model=12"), seed=5).eval()
    plain.load_state_dict({k: v for k, v in mh.state_dict().items() if not k.startswith("multi_head.")})
    x = torch.randn(7, 48)
    sd = mh.state_dict()
    x_sub = (x @ sd["multi_head.w_in"].T + sd["multi_head.b_in"]).reshape(28, 12)
    y = plain(x_sub).reshape(7, 48) @ sd["multi_head.w_out"].T + sd["multi_head.b_out"]
    torch.testing.assert_close(mh(x), y, atol=1e-5, rtol=1e-5)


def test_state_dict_names():
    keys = set(moespec.build(MH, SMALL).state_dict())
    assert {"multi_head.w_in", "multi_head.b_in", "multi_head.w_out", "multi_head.b_out"} <= keys
    assert moespec.build(MH, SMALL).get_parameter("router.proj").shape == (16, 12)  # D/h in, X-MoE's 16 out


@pytest.mark.parametrize(
    "over,match",
    [
        (("layer.multi_head.heads=5",), "heads=5 does not divide d_model=48"),
        (("layer.multi_head.heads=1",), "greater than 1"),
    ],
)
def test_bad_multi_head(over, match):
    with pytest.raises(moespec.SpecError, match=match):
        moespec.load_spec(MH, (*SMALL, *over))


def test_multi_head_with_per_token_router_inputs_is_rejected():
    over = ("layer.router.gating_residual=true", "layer.multi_head={heads: 2}")
    with pytest.raises(moespec.SpecError, match="no sub-token form"):
        moespec.load_spec(TINY, over)


def test_mh_moe_numbers(explain_layer):
    layer = explain_layer(MH)
    d, h, f, e, k = 768, 4, 3072, 32, 2
    sub = d // h
    expert = 2 * sub * f + f + sub
    proj = 2 * d * d + 2 * d
    router = sub * 16 + 16 * e  # X-MoE cosine router: W_proj [16, D/h] and expert embeddings [E, 16]
    assert layer["params_total"] == e * expert + router + proj
    assert layer["params_active"] == router + h * k * expert + proj  # up to h·k distinct experts
    assert layer["flops_per_token"] == 2 * (h * (router + k * 2 * sub * f) + 2 * d * d)
