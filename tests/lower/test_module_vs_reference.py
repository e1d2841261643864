"""moespec.build(...) modules (FX graph of fused ops) against the plain-PyTorch reference.

Forward output, aux loss and the gradient of every parameter, train and eval, at the initial
weights and moved away from them, on specs that exercise every feature (capacity policies,
jitter, learned/fixed noise, GShard policies, groups, expert bias, sigmoid,
heterogeneous/shared/zero-compute experts), odd shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec.reference import moe_layer_reference

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = str(SPECS / "debug-tiny.yaml")

CASES = [
    ("debug-tiny.yaml", ()),
    ("debug-hetero.yaml", ()),
    ("debug-capacity.yaml", ()),
    ("debug-base.yaml", ()),  # jitter, position capacity, mlp+bias
    ("debug-groups.yaml", ()),
    (
        "debug-tiny.yaml",
        (
            "layer.router.order=topk_then_softmax",
            "~layer.router.renormalize",
            "layer.router.noise={kind: learned}",
            "layer.losses.load_balance={kind: importance_load_cv2, importance_weight: 0.1, load_weight: 0.1}",
        ),
    ),
    (
        "debug-tiny.yaml",
        (
            "layer.router.noise={kind: fixed, std: 0.5}",
            "layer.losses.z_loss={weight: 0.01}",
            "layer.capacity={kind: factor, train_factor: 0.8, eval_factor: 1.1, drop_policy: random}",
        ),
    ),
    (  # V-MoE's batch priority routing (issue 20 §1)
        "debug-tiny.yaml",
        ("layer.capacity={kind: factor, train_factor: 0.6, eval_factor: 0.9, drop_policy: batch_priority}",),
    ),
    ("debug-tiny.yaml", ("layer.router.second_expert_policy=sampling", "layer.router.temperature=0.7")),
    (  # GPT-OSS's clamped SwiGLU (a limit small enough to clamp at these sizes), shared too
        "debug-tiny.yaml",
        (
            "layer.experts.routed.0={count: 4, kind: glu, activation: silu, d_ff: 64, bias: true, "
            "limit: 0.05, alpha: 1.702, up_offset: 1.0}",
            "layer.experts.shared={kind: glu, activation: gelu, d_ff: 16, limit: 0.05, up_offset: 1.0}",
            "layer.router.bias=true",
        ),
    ),
    (
        "debug-tiny.yaml",
        (
            "layer.router.second_expert_policy=random",
            "layer.router.bias=true",
            "layer.losses.load_balance={kind: gshard, weight: 0.01, scope: sequence}",
        ),
    ),
    (  # DeepSeek-V3's balance loss as the paper writes it: f from the unbiased top-k
        "debug-tiny.yaml",
        (
            "layer.router.score=sigmoid",
            "layer.router.groups={n_groups: 2, topk_groups: 1}",
            "layer.router.expert_bias={update_rate: 0.01}",
            "layer.losses.load_balance={kind: switch, weight: 0.01, scope: sequence, count: unbiased_topk}",
        ),
    ),
]


def _run_both(path, overrides, x, training, move=None):
    layer_name = "late" if "groups" in path else None
    m = moespec.build(
        str(SPECS / path), overrides, layer=layer_name, seed=3, generator=torch.Generator().manual_seed(11)
    )
    if move is not None:
        move(m)  # weights away from their initial values (see tests/conftest.py)
    m.train(training)
    loaded = moespec.load_spec(str(SPECS / path), overrides)
    spec_layer = loaded.spec.layer_named(layer_name)
    params = {
        k: v.detach().clone().requires_grad_(v.is_floating_point() and "expert_bias" not in k)
        for k, v in m.state_dict().items()
    }
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = m(x1)
    y2, aux2, _ = moe_layer_reference(
        x2,
        params,
        spec_layer,
        loaded.spec.d_model,
        training=training,
        generator=torch.Generator().manual_seed(11),
        router_dtype=loaded.spec.target.router_dtype,
    )
    return m, params, (x1, y1, m.aux_loss), (x2, y2, aux2)


@pytest.mark.parametrize("away", [False, True], ids=["init", "moved"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("path,overrides", CASES)
def test_module_matches_reference(path, overrides, training, away, move_away_from_init):
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(5))
    move = move_away_from_init if away else None
    m, params, (x1, y1, a1), (x2, y2, a2) = _run_both(path, overrides, x, training, move)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=1e-5)
    probe = torch.linspace(-1, 1, y1.numel()).view_as(y1)
    (y1 * probe).sum().add(a1).backward()
    (y2 * probe).sum().add(a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    named = dict(m.named_parameters())
    assert set(named) == {k for k, v in params.items() if v.requires_grad}
    for name, p in named.items():
        ref = params[name].grad
        ref = torch.zeros_like(p) if ref is None else ref
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d", [48, 100])
def test_odd_shapes(t, d):
    over = (f"d_model={d}", "layer.experts.routed.0.d_ff=100")
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(t))
    _, _, (_, y1, a1), (_, y2, a2) = _run_both("debug-tiny.yaml", over, x, True)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a1, a2)


def test_all_tokens_on_one_expert_and_empty_experts():
    m = moespec.build(TINY, ("layer.router.k=1",))
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[2] = 1.0  # expert 2 wins for every token with positive sum
    x = torch.rand(64, 32) + 0.1
    y = m(x)
    assert m.routing_stats["tokens_per_expert"].tolist() == [0, 0, 64, 0]
    assert torch.isinf(m.routing_stats["load_ratio"])
    y.sum().backward()
    w_up = m.get_parameter("experts.0.w_up")
    assert w_up.grad[0].abs().sum() == 0 and w_up.grad[2].abs().sum() > 0


def test_capacity_overflow_drops_and_reports():
    m = moespec.build(
        TINY, ("layer.capacity={kind: factor, train_factor: 0.25, eval_factor: 0.25, min_capacity: 1}",)
    )
    y = m(torch.randn(64, 32))
    assert 0 < float(m.routing_stats["dropped_fraction"]) < 1
    assert int(m.routing_stats["tokens_per_expert"].max()) <= 8  # C = ceil(0.25*64*2/4)
    assert y.shape == (64, 32)
