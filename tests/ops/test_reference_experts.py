"""Reference experts and parameters: activations, FFN/GLU by hand, zero-compute experts,
fine-grained index ranges, shared experts, parameter shapes vs. the derived numbers, init.

Shape legend: N rows, D d_model, F ffn width, E experts, S shared experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from moespec.ir.numbers import layer_numbers
from moespec.reference import (
    ACTIVATIONS,
    BUFFERS,
    expert_forward,
    expert_table,
    ffn,
    init_reference_params,
    param_shapes,
    shared_forward,
)
from moespec.spec.schema import LayerSpec, Spec


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("relu", F.relu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh")),
        ("silu", F.silu),
    ],
)
def test_activations_match_torch(name: str, ref: Callable[[torch.Tensor], torch.Tensor]) -> None:
    v = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS[name](v), ref(v))


def test_ffn_by_hand() -> None:
    x = torch.tensor([[1.0, -2.0]])
    w_up = torch.tensor([[1.0, 1.0], [0.5, 0.0]])  # up = [-1, 0.5]
    w_gate = torch.tensor([[0.0, -1.0], [2.0, 0.0]])  # gate = [2, 2]
    w_down = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    # mlp relu: h = [0, 0.5] -> [1, 0]
    torch.testing.assert_close(
        ffn(x, w_up, w_down, kind="mlp", activation="relu"), torch.tensor([[1.0, 0.0]])
    )
    # glu relu: h = [2 * -1, 2 * 0.5] = [-2, 1] -> [0, -6]
    y = ffn(x, w_up, w_down, kind="glu", activation="relu", w_gate_FD=w_gate)
    torch.testing.assert_close(y, torch.tensor([[0.0, -6.0]]))
    # biases: up + [1, 0] -> h = relu([0, 0.5]) = [0, 0.5]; down + [10, 20]
    y = ffn(
        x,
        w_up,
        w_down,
        kind="mlp",
        activation="relu",
        b_up_F=torch.tensor([1.0, 0.0]),
        b_down_D=torch.tensor([10.0, 20.0]),
    )
    torch.testing.assert_close(y, torch.tensor([[11.0, 20.0]]))


def layer(**experts: object) -> LayerSpec:
    return LayerSpec.model_validate({"experts": experts, "router": {"kind": "topk", "k": 2}})


HETERO = layer(
    routed=[
        {"kind": "glu", "activation": "silu", "d_ff": 32, "count": 2, "granularity": 4},
        {"kind": "mlp", "activation": "gelu", "d_ff": 20, "count": 3, "bias": True},
    ],
    zero_compute=[{"kind": "copy"}, {"kind": "constant", "count": 2}, {"kind": "zero"}],
    shared={"kind": "glu", "activation": "silu", "d_ff": 16, "count": 2, "gate": True},
)


def test_clamped_glu_by_hand() -> None:
    """GPT-OSS's clamped SwiGLU, element by element: g = min(gate, limit),
    u = clamp(up, -limit, limit), h = g sigmoid(alpha g) (u + 1)."""
    x = torch.tensor([[1.0, 0.0]])
    w_gate = torch.tensor([[9.0, 0.0], [-2.0, 0.0], [0.5, 0.0]])  # gate = 9 (clamped), -2, 0.5
    w_up = torch.tensor([[-8.0, 0.0], [3.0, 0.0], [0.25, 0.0]])  # up = -8 (clamped), 3, 0.25
    w_down = torch.eye(2, 3)
    y = ffn(
        x,
        w_up,
        w_down,
        kind="glu",
        activation="silu",
        w_gate_FD=w_gate,
        limit=7.0,
        alpha=1.702,
        up_offset=1.0,
    )
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    h = [7 * sig(1.702 * 7) * (-7 + 1), -2 * sig(-1.702 * 2) * (3 + 1)]
    torch.testing.assert_close(y, torch.tensor([h]))
    # The limit alone (DeepSeek-V4): plain SiLU of the clamped gate times the clamped up.
    y = ffn(x, w_up, w_down, kind="glu", activation="silu", w_gate_FD=w_gate, limit=2.5)
    torch.testing.assert_close(
        y, torch.tensor([[F.silu(torch.tensor(2.5)).item() * -2.5, F.silu(torch.tensor(-2.0)).item() * 2.5]])
    )


def test_clamped_glu_matches_transformers_gpt_oss() -> None:
    """The reference's clamped GLU equals transformers' GptOssExperts._apply_gate (which
    interleaves gate and up columns)."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    cfg = pytest.importorskip("transformers").GptOssConfig(
        hidden_size=8, intermediate_size=6, num_local_experts=2, swiglu_limit=1.0
    )
    experts = gpt_oss.GptOssExperts(cfg)
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(5, 12, generator=g) * 2
    want = experts._apply_gate(gate_up)
    x = gate_up  # the rows are the pre-activations: identity weights pick gate and up columns
    eye = torch.eye(12)
    got = ffn(
        x, eye[1::2], torch.eye(6), kind="glu", activation="silu", w_gate_FD=eye[::2],
        limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha, up_offset=1.0,
    )  # fmt: skip
    torch.testing.assert_close(got, want)


def test_softcapped_glu_matches_transformers_inkling2() -> None:
    """The reference's softcapped SwiGLU equals transformers' Inkling2SoftcappedSwiGLU."""
    inkling2 = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
    cfg = pytest.importorskip("transformers").Inkling2TextConfig(mlp_gate_softcap=0.8, mlp_up_softcap=1.5)
    g = torch.Generator().manual_seed(0)
    gate_N6, up_N6 = torch.randn(5, 6, generator=g) * 2, torch.randn(5, 6, generator=g) * 2
    want = inkling2.Inkling2SoftcappedSwiGLU(cfg)(gate_N6, up_N6)
    eye = torch.eye(12)
    got = ffn(
        torch.cat([gate_N6, up_N6], 1), eye[6:], torch.eye(6), kind="glu", activation="silu",
        w_gate_FD=eye[:6], gate_softcap=0.8, up_softcap=1.5,
    )  # fmt: skip
    torch.testing.assert_close(got, want)


def test_expert_table_index_ranges() -> None:
    t = [(s.start, s.stop, s.kind, s.group) for s in expert_table(HETERO.experts)]
    assert t == [
        (0, 8, "ffn", 0),
        (8, 11, "ffn", 1),
        (11, 12, "copy", 0),
        (12, 14, "constant", 1),
        (14, 15, "zero", 2),
    ]
    shapes = param_shapes(HETERO, 48)
    assert shapes["experts.0.w_up"] == (8, 8, 48) and shapes["experts.0.w_down"] == (8, 48, 8)
    assert shapes["experts.1.b_up"] == (3, 20) and "experts.1.w_gate" not in shapes
    assert shapes["zero_compute.1.w_c"] == (2, 2, 48) and "zero_compute.0.v" not in shapes


def test_zero_compute_experts() -> None:
    params = init_reference_params(HETERO, 48, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 48)
    assert torch.equal(expert_forward(11, x, params, HETERO.experts), x)  # copy
    assert torch.equal(expert_forward(14, x, params, HETERO.experts), torch.zeros(5, 48))  # zero
    # constant with W_c = 0: a = [0.5, 0.5] -> 0.5 x + 0.5 v
    params["zero_compute.1.w_c"] = torch.zeros(2, 2, 48)
    v = params["zero_compute.1.v"][1]
    torch.testing.assert_close(expert_forward(13, x, params, HETERO.experts), 0.5 * x + 0.5 * v)
    # W_c picking only x: a1 = sigmoid(l0 - l1)
    w_c = torch.zeros(2, 48)
    w_c[0, 0] = 1.0
    params["zero_compute.1.w_c"] = torch.stack([w_c, w_c])
    a1 = torch.sigmoid(x[:, :1])
    torch.testing.assert_close(
        expert_forward(12, x, params, HETERO.experts), a1 * x + (1 - a1) * params["zero_compute.1.v"][0]
    )


def test_fine_grained_expert_is_its_slice() -> None:
    params = init_reference_params(HETERO, 48, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 48)
    p = {k: params[f"experts.0.{k}"][5] for k in ("w_up", "w_gate", "w_down")}
    want = ffn(x, p["w_up"], p["w_down"], kind="glu", activation="silu", w_gate_FD=p["w_gate"])
    torch.testing.assert_close(expert_forward(5, x, params, HETERO.experts), want)


def test_shared_experts_sum_equals_fused_wide_ffn() -> None:
    params = init_reference_params(HETERO, 48, generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 48)
    # DeepSeek fuses S shared experts into one FFN of width S*d_ff
    up = params["shared.w_up"].reshape(32, 48)
    gate = params["shared.w_gate"].reshape(32, 48)
    down = torch.cat(list(params["shared.w_down"]), dim=1)
    fused = ffn(x, up, down, kind="glu", activation="silu", w_gate_FD=gate)
    torch.testing.assert_close(
        shared_forward(x, params, HETERO.experts.shared),
        torch.sigmoid(x @ params["shared.gate"])[:, None] * fused,
    )


def test_param_count_matches_derived_numbers() -> None:
    for extra in ({}, {"bias": True, "noise": {"kind": "learned"}, "expert_bias": {}}):
        spec = Spec.model_validate(
            {
                "moespec": 1,
                "name": "t",
                "d_model": 48,
                "layer": {
                    **HETERO.model_dump(exclude_defaults=True),
                    "router": {"kind": "topk", "k": 2, **extra},
                },
            }
        )
        shapes = param_shapes(spec.layer, 48)
        trainable = sum(math.prod(s) for n, s in shapes.items() if n not in BUFFERS)
        assert trainable == layer_numbers(spec, "layer", 1, spec.layer).params_total


def test_init_follows_the_spec() -> None:
    spec = layer(
        routed=[
            {
                "kind": "glu",
                "activation": "silu",
                "d_ff": 64,
                "count": 4,
                "init": {"kind": "trunc_normal", "std": 0.1},
            },
            {
                "kind": "mlp",
                "activation": "relu",
                "d_ff": 50,
                "count": 2,
                "bias": True,
                "init": {"kind": "uniform_fan_in"},
            },
            {
                "kind": "mlp",
                "activation": "relu",
                "d_ff": 64,
                "count": 4,
                "init": {"std": 0.05, "output_scale": 0.1},
            },
        ]
    )
    a = init_reference_params(spec, 100, generator=torch.Generator().manual_seed(0))
    b = init_reference_params(spec, 100, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert a["experts.0.w_up"].abs().max() <= 0.2 and a["experts.0.w_up"].std() == pytest.approx(
        0.088, rel=0.1
    )
    assert a["experts.1.w_up"].abs().max() <= 1 / math.sqrt(100) and a["experts.1.b_up"].abs().max() > 0
    assert a["experts.1.w_down"].abs().max() <= 1 / math.sqrt(50)
    assert a["experts.2.w_up"].std() == pytest.approx(0.05, rel=0.1)
    assert a["experts.2.w_down"].std() == pytest.approx(0.005, rel=0.1)
    assert a["router.weight"].std() == pytest.approx(0.02, rel=0.2)
    half = init_reference_params(spec, 100, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in half.values())
