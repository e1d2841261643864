"""MoE++: zero-computation experts with the gating residual across consecutive layers (the
`prev_router_logits` port) and the logits-std normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"
MPP = str(SPECS / "moe-plus-plus.yaml")
SMALL = ("d_model=32", "layer.experts.routed.0.d_ff=16", "target.dtype=fp32")


def _z(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, 20, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_module_matches_reference_with_residual(compare, t, training):
    x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
    compare(MPP, SMALL, x, training=training, inputs={"prev_router_logits": _z(t)})


def test_module_matches_reference_without_residual_input(compare):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    compare(MPP, SMALL, x, training=True)


def test_missing_prev_logits_means_zeros():
    m = moespec.build(MPP, SMALL, seed=1)
    x = torch.randn(6, 32)
    torch.testing.assert_close(m(x), m(x, prev_router_logits=torch.zeros(6, 20)))
    assert not torch.equal(m(x), m(x, prev_router_logits=_z(6)))


def test_router_logits_chain_across_layers_and_carry_gradients():
    first, second = moespec.build(MPP, SMALL, seed=1), moespec.build(MPP, SMALL, seed=2)
    x = torch.randn(2, 4, 32)
    h = first(x)
    # 3-D input: the port takes the [T, E] router_logits or the [B, S, E] form.
    y = second(h, prev_router_logits=first.router_logits)
    z_prev, w_res = first.router_logits.detach(), second.router.residual_weight.detach()
    expected = second.router.weight.detach() @ h.detach().reshape(8, 32).T
    torch.testing.assert_close(
        second.router_logits.detach(), expected.T + z_prev @ w_res.T, rtol=1e-5, atol=1e-5
    )
    y.sum().backward()
    # The cross-layer edge: the second layer's loss reaches the first layer's router twice
    # (through h and through the residual logits).
    assert first.router.weight.grad is not None and first.router.weight.grad.abs().sum() > 0
    assert second.router.residual_weight.grad.abs().sum() > 0
    second(h.detach(), prev_router_logits=first.router_logits.reshape(2, 4, 20))


def test_logit_std_rescales_scores():
    m = moespec.build(MPP, SMALL, seed=3).eval()
    x = torch.randn(9, 32)
    m(x)
    z = m.router_logits
    p = (z / z.std(-1, keepdim=True)).softmax(-1)
    top = p.topk(2, dim=-1)
    assert set(m.routing_stats["routed_per_expert"].nonzero().flatten().tolist()) == set(
        top.indices.unique().tolist()
    )


@pytest.mark.parametrize(
    "value,err,match",
    [
        (torch.zeros(6, 19), ValueError, r"must have shape \(6, 20\)"),
        (torch.zeros(6, 20, dtype=torch.int64), TypeError, "floating-point"),
    ],
)
def test_bad_prev_logits(value, err, match):
    m = moespec.build(MPP, SMALL)
    with pytest.raises(err, match=match):
        m(torch.randn(6, 32), prev_router_logits=value)


def test_topk_without_residual_rejects_the_port():
    m = moespec.build(str(SPECS / "debug-tiny.yaml"))
    with pytest.raises(TypeError, match="takes no input 'prev_router_logits'"):
        m(torch.randn(3, 32), prev_router_logits=torch.zeros(3, 4))


def test_moe_plus_plus_numbers(explain_layer):
    layer = explain_layer(MPP)
    d, f, e = 1536, 4096, 20
    ffn = 3 * d * f
    router = d * e + e * e  # W_g and the gating residual's W_res
    constants = 2 * 3 * d  # w_c [2, D] + v [D] per constant expert
    assert layer["params_total"] == 16 * ffn + router + constants
    assert layer["params_active"] == router + 2 * ffn  # the two most expensive: FFN experts
    assert layer["flops_per_token"] == 2 * (router + 2 * ffn)
