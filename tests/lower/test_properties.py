"""Property tests: for any valid spec, the built module computes what the reference computes.

Hypothesis composes a dict spec from every feature of the language (1-3 heterogeneous routed
groups with kinds, activations, widths, biases and fine-grained granularity; shared experts
with or without gate; zero-compute experts; the top-k router's k, score, order,
renormalisation, scaling, temperature, bias, jitter or noise, group-limited selection,
expert bias, GShard second-expert policies; dropless or factor capacity with each drop
policy; the balance losses with their scopes and the z-loss), keeps it only if
``moespec.load_spec`` accepts it, and checks that ``moespec.build`` succeeds and that, in
eval and in train mode, the module's output, aux loss, routing statistics, input gradient
and parameter gradients match ``moe_layer_reference`` fed the module's own weights and an
equally seeded generator (and that the aux-loss-free bias moved as the reference update says).

Weights are redrawn at 1/sqrt(fan_in) scale (the default 0.02 init makes outputs so small
that an absolute tolerance would hide everything). Bounded (40 examples, tiny T) and
derandomized so CI is reproducible; MOESPEC_PROP_EXAMPLES=500 MOESPEC_PROP_RANDOM=1 runs a
longer, fresh hunt.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moespec
from moespec.errors import SpecError
from moespec.reference import moe_layer_reference, update_expert_bias
from moespec.runtime.layer import MoELayer

EXAMPLES = int(os.environ.get("MOESPEC_PROP_EXAMPLES", "40"))
RANDOM = os.environ.get("MOESPEC_PROP_RANDOM") == "1"
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu"]


@st.composite
def ffn(draw: st.DrawFn, routed: bool, aligned: bool) -> dict[str, Any]:
    width = draw(st.sampled_from([4, 8]) if aligned else st.integers(2, 9))
    out: dict[str, Any] = {
        "kind": draw(st.sampled_from(["mlp", "glu"])),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "bias": draw(st.booleans()),
    }
    if routed:
        gran = draw(st.integers(1, 3))
        out |= {"count": draw(st.integers(1, 3)), "granularity": gran, "d_ff": gran * width}
    else:
        out |= {"count": draw(st.integers(1, 2)), "d_ff": width, "gate": draw(st.booleans())}
    return out


@st.composite
def router(draw: st.DrawFn, n_experts: int, has_noise_loss: bool) -> dict[str, Any]:
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    r: dict[str, Any] = {
        "kind": "topk",
        "score": score,
        "order": "softmax_then_topk"
        if score == "sigmoid"
        else draw(st.sampled_from(["softmax_then_topk", "topk_then_softmax"])),
        "renormalize": draw(st.booleans()),
        "scaling_factor": draw(st.sampled_from([1.0, 0.5, 2.5])),
        "temperature": draw(st.sampled_from([1.0, 0.7, 2.0])),
        "bias": draw(st.booleans()),
    }
    noise = draw(st.sampled_from(["none", "jitter", "fixed", "learned"]))
    if has_noise_loss and noise in ("none", "jitter"):
        noise = "learned"
    if noise == "jitter":
        r["jitter"] = draw(st.sampled_from([0.01, 0.2]))
    elif noise == "fixed":
        r["noise"] = {"kind": "fixed", "std": draw(st.sampled_from([0.1, 1.0]))}
    elif noise == "learned":
        r["noise"] = {"kind": "learned", "epsilon": draw(st.sampled_from([0.0, 0.01]))}
    max_k = n_experts
    if draw(st.booleans()):
        n_groups = draw(st.sampled_from([g for g in range(1, n_experts + 1) if n_experts % g == 0]))
        per = n_experts // n_groups
        topk_groups = draw(st.integers(1, n_groups))
        r["groups"] = {
            "n_groups": n_groups,
            "topk_groups": topk_groups,
            "group_score": "top2_sum" if per >= 2 and draw(st.booleans()) else "max",
        }
        max_k = topk_groups * per
    r["k"] = draw(st.integers(1, min(max_k, 4)))
    if draw(st.booleans()):
        r["expert_bias"] = {"update_rate": draw(st.sampled_from([0.001, 0.1]))}
    if r["k"] == 2 and score == "softmax":
        r["second_expert_policy"] = draw(st.sampled_from(["all", "sampling", "random"]))
    return r


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    # Half the specs have d_model and every width a multiple of 4 (16-byte aligned rows: the
    # grouped_mm path where it is used), the others odd sizes (the loop fallback).
    aligned = draw(st.booleans())
    routed = draw(st.lists(ffn(routed=True, aligned=aligned), min_size=1, max_size=3))
    experts: dict[str, Any] = {"routed": routed}
    if draw(st.booleans()):
        experts["shared"] = draw(ffn(routed=False, aligned=aligned))
    if draw(st.booleans()):
        experts["zero_compute"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"kind": st.sampled_from(["zero", "copy", "constant"]), "count": st.integers(1, 2)}
                ),
                min_size=1,
                max_size=3,
            )
        )
    n_experts = sum(g["count"] * g["granularity"] for g in routed) + sum(
        z["count"] for z in experts.get("zero_compute", [])
    )
    losses: dict[str, Any] = {}
    balance = draw(st.sampled_from(["none", "switch", "gshard", "importance_load_cv2"]))
    scope = draw(st.sampled_from(["batch", "sequence"]))
    if balance in ("switch", "gshard"):
        losses["load_balance"] = {
            "kind": balance,
            "weight": draw(st.sampled_from([0.01, 1.0])),
            "scope": scope,
        }
    elif balance == "importance_load_cv2":
        losses["load_balance"] = {
            "kind": balance,
            "importance_weight": 0.1,
            "load_weight": 0.5,
            "scope": scope,
        }
    if draw(st.booleans()):
        losses["z_loss"] = {"weight": draw(st.sampled_from([0.001, 0.1]))}
    capacity: dict[str, Any] = {"kind": "dropless"}
    if draw(st.booleans()):
        capacity = {
            "kind": "factor",
            "train_factor": draw(st.sampled_from([0.5, 1.0, 1.25])),
            "eval_factor": draw(st.sampled_from([0.5, 1.0, 2.0])),
            "min_capacity": draw(st.integers(0, 3)),
            "drop_policy": draw(st.sampled_from(["position", "score", "batch_priority", "random"])),
        }
    layer = {
        "experts": experts,
        "router": draw(router(n_experts, balance == "importance_load_cv2")),
        "capacity": capacity,
        "losses": losses,
    }
    out: dict[str, Any] = {
        "moespec": 1,
        "name": "prop",
        "d_model": draw(st.sampled_from([4, 8, 12]) if aligned else st.integers(2, 13)),
        "layer": layer,
    }
    # Selective precision: fp32 or fp64 activations, router in either (global or per router).
    if draw(st.booleans()):
        out["target"] = {
            "dtype": draw(st.sampled_from(["fp32", "fp64"])),
            "router_dtype": draw(st.sampled_from(["fp32", "fp64"])),
        }
        if draw(st.booleans()):
            layer["router"]["dtype"] = draw(st.sampled_from(["fp32", "fp64"]))
    return out


def _redraw(module: torch.nn.Module, seed: int) -> None:
    """Weights at unit output scale: randn / sqrt(fan_in) (last dim); vectors randn * 0.5."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: torch.randn(v.shape, generator=g) * (0.5 if v.dim() == 1 else 1.0 / math.sqrt(v.shape[-1]))
        for k, v in module.state_dict().items()
    }  # load_state_dict casts to the parameters' dtype
    module.load_state_dict(sd)


def _check_mode(m: MoELayer, loaded: Any, x: torch.Tensor, training: bool) -> None:
    layer = loaded.spec.layer
    m.train(training)
    m.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params = {k: v.clone().requires_grad_(k != "router.expert_bias") for k, v in state.items()}
    m.generator = torch.Generator().manual_seed(11)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = m(x1)
    a1 = m.aux_loss
    y2, a2, stats = moe_layer_reference(
        x2,
        params,
        layer,
        loaded.spec.d_model,
        training=training,
        generator=torch.Generator().manual_seed(11),
        router_dtype=loaded.spec.target.router_dtype,
    )
    mode = "train" if training else "eval"
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4, msg=lambda s: f"{mode} y: {s}")
    torch.testing.assert_close(a1, a2, atol=1e-5, rtol=1e-4, msg=lambda s: f"{mode} aux: {s}")
    rs = m.routing_stats
    assert rs["routed_per_expert"].tolist() == stats.routed_per_expert.tolist(), mode
    assert rs["tokens_per_expert"].tolist() == stats.tokens_per_expert.tolist(), mode
    assert math.isclose(float(rs["dropped_fraction"]), stats.dropped_fraction, abs_tol=1e-6), mode
    assert math.isclose(float(rs["router_entropy"]), stats.router_entropy, rel_tol=1e-5, abs_tol=1e-6), mode
    ratio, want_ratio = float(rs["load_ratio"]), stats.load_ratio
    same = math.isclose(ratio, want_ratio, rel_tol=1e-6) or (math.isnan(ratio) and math.isnan(want_ratio))
    assert same, (mode, ratio, want_ratio)  # stats are fp32 tensors, the reference's floats fp64

    # Aux-loss-free bias: moves only while training, exactly as the reference update says.
    if "router.expert_bias" in state:
        want = state["router.expert_bias"]
        if training:
            rate = layer.router.expert_bias.update_rate
            want = update_expert_bias(want, stats.routed_per_expert, rate)
        torch.testing.assert_close(m.router.expert_bias, want, atol=1e-7, rtol=0, msg=f"{mode} expert_bias")

    probe = torch.linspace(-1.0, 1.0, y1.numel()).view_as(y1)
    (y1 * probe).sum().add(a1).backward()
    (y2 * probe).sum().add(a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4, msg=lambda s: f"{mode} dx: {s}")
    for name, p in m.named_parameters():
        ref = params[name].grad
        ref = torch.zeros_like(p) if ref is None else ref
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda s, n=name: f"{mode} d{n}: {s}")


@SETTINGS
@given(
    spec=specs(),
    shape=st.one_of(
        st.tuples(st.integers(1, 9)),  # [T, D]
        st.tuples(st.integers(1, 3), st.integers(1, 4)),  # [B, S, D]
    ),
    seed=st.integers(0, 2**16),
)
def test_module_matches_reference_for_any_valid_spec(spec: dict, shape: tuple[int, ...], seed: int) -> None:
    try:
        loaded = moespec.load_spec(spec)
    except SpecError:
        loaded = None
    assume(loaded is not None)  # the strategies aim at valid specs; keep only those
    m = moespec.build(loaded, seed=seed)
    d = loaded.spec.d_model
    assert {n for n, _ in m.named_buffers()} <= {"router.expert_bias"}
    _redraw(m, seed)
    x = torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed + 1)).to(m.dtype)
    _check_mode(m, loaded, x, training=False)
    _check_mode(m, loaded, x, training=True)


# --- grouped-GEMM alignment ----------------------------------------------------------------
# moespec.ops.gemm uses torch's grouped_mm only where its operands are 16-byte aligned
# (``_aligned``) and a loop of mm otherwise. With the old ``_aligned`` (it skipped size-1 and
# stride-1 dims) and grouped_mm on the CPU, the cases below crashed with "strides should be
# multiple of 16 bytes": an expert group with at most one row while d_model or its width is
# not a multiple of 4, or d_model / width 1. Regression tests for the whole layer, plus a
# direct check of ``_aligned`` against grouped_mm's own check (what decides it off the CPU).


def _tiny(d: int, routed: list[dict[str, Any]], k: int = 1) -> dict[str, Any]:
    return {
        "moespec": 1,
        "name": "gmm-rows",
        "d_model": d,
        "layer": {"experts": {"routed": routed}, "router": {"kind": "topk", "k": k}},
    }


def _swiglu(d_ff: int, count: int) -> dict[str, Any]:
    return {"kind": "glu", "activation": "silu", "d_ff": d_ff, "count": count}


@pytest.mark.parametrize(
    "d,routed,n_tokens",
    [
        (30, [_swiglu(30, 8)], 1),  # one token, k=1: the expert group computes one row
        (32, [_swiglu(30, 8)], 1),  # aligned d_model, unaligned width
        (6, [_swiglu(6, 2), _swiglu(10, 2)], 1),  # one group gets the token, the other none
        (30, [_swiglu(32, 4)], 0),  # empty input in training
    ],
    ids=["T1-d30", "T1-f30", "hetero-empty-group", "T0-d30"],
)
def test_backward_with_single_row_or_empty_groups(d: int, routed: list, n_tokens: int) -> None:
    m = moespec.build(_tiny(d, routed)).train()
    x = torch.randn(n_tokens, d, requires_grad=True)
    y = m(x)
    (y.sum() + m.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("d,d_ff", [(1, 8), (8, 1), (1, 1)], ids=["d_model=1", "d_ff=1", "both=1"])
def test_unit_dims(d: int, d_ff: int) -> None:
    m = moespec.build(_tiny(d, [_swiglu(d_ff, 2)]))
    x = torch.randn(4, d, requires_grad=True)
    y = m(x)
    assert y.shape == (4, d)
    y.sum().backward()
    assert x.grad is not None


def _grouped_mm_accepts(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> bool:
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("torch without grouped_mm")
    try:
        grouped_mm(a, b, offs=offs)
    except RuntimeError as e:
        if "16 bytes" not in str(e):
            raise
        return False
    return True


def _gmm_operands(case: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operands moespec.ops.gemm hands grouped_mm: gmm(x [N, K], W^T [E, K, M]) and
    gmm_wgrad(g^T [M, N] made contiguous, x [N, K])."""
    i32 = torch.int32
    if case == "fwd-d_model=1":  # x_RD [R, 1] @ w_up [E, F, 1]^T
        return torch.randn(4, 1), torch.randn(2, 8, 1).transpose(1, 2), torch.tensor([2, 4], dtype=i32)
    if case == "wgrad-one-row":  # g [1, M]^T, x_RD [1, K=30]
        return torch.randn(1, 8).t().contiguous(), torch.randn(1, 30), torch.tensor([1], dtype=i32)
    if case == "wgrad-no-row":
        return torch.randn(0, 8).t().contiguous(), torch.randn(0, 30), torch.tensor([0], dtype=i32)
    if case == "fwd-aligned":  # a case both agree on
        return torch.randn(4, 32), torch.randn(2, 8, 32).transpose(1, 2), torch.tensor([2, 4], dtype=i32)
    raise ValueError(case)


@pytest.mark.parametrize("case", ["fwd-aligned", "fwd-d_model=1", "wgrad-one-row", "wgrad-no-row"])
def test_alignment_check_agrees_with_grouped_mm(case: str) -> None:
    """``_aligned`` must never call operands aligned that grouped_mm rejects."""
    from moespec.ops import gemm

    a, b, offs = _gmm_operands(case)
    assert gemm._aligned(a, b) == _grouped_mm_accepts(a, b, offs)
