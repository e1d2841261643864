"""The checkpoint contract of built modules (torchtitan test_state_dict_keys.py style).

The state_dict keys, their order and shapes are written out literally below: a checkpoint
saved by one moespec version must load into the next, so a change here is a deliberate,
reviewed change of the contract (see moespec.reference.params for the naming rules).
Also: buffers vs parameters, load_state_dict round trips, seeded init, the parameter count
`moespec explain` reports, and that every parameter is trained (gets a gradient).

Shape legend: D d_model, E experts, F expert width, S shared experts.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import moespec
from moespec.explain import explain_data
from moespec.runtime.layer import MoELayer

SPECS = Path(__file__).resolve().parents[2] / "specs"

# id -> (spec file, overrides, layer group, exact [(key, shape)] of state_dict(), in order)
CONTRACT: dict[str, tuple[str, tuple[str, ...], str | None, list[tuple[str, tuple[int, ...]]]]] = {
    "debug-tiny": (
        "debug-tiny.yaml",
        (),
        None,
        [
            ("router.weight", (4, 32)),
            ("experts.0.w_up", (4, 64, 32)),
            ("experts.0.w_gate", (4, 64, 32)),
            ("experts.0.w_down", (4, 32, 64)),
        ],
    ),
    "debug-hetero": (
        "debug-hetero.yaml",
        (),
        None,
        [
            ("router.weight", (8, 32)),
            ("experts.0.w_up", (3, 64, 32)),
            ("experts.0.w_gate", (3, 64, 32)),
            ("experts.0.w_down", (3, 32, 64)),
            ("experts.1.w_up", (2, 96, 32)),
            ("experts.1.w_down", (2, 32, 96)),
            ("experts.1.b_up", (2, 96)),
            ("experts.1.b_down", (2, 32)),
            ("shared.w_up", (1, 64, 32)),
            ("shared.w_gate", (1, 64, 32)),
            ("shared.w_down", (1, 32, 64)),
            ("shared.gate", (32,)),
            # z is the index in the zero_compute list: zero (0) and copy (1) have no weights.
            ("zero_compute.2.w_c", (1, 2, 32)),
            ("zero_compute.2.v", (1, 32)),
        ],
    ),
    "debug-base+router-bias": (
        "debug-base.yaml",
        ("layer.router.bias=true",),
        None,
        [
            ("router.weight", (8, 32)),
            ("router.bias", (8,)),
            ("experts.0.w_up", (8, 64, 32)),
            ("experts.0.w_down", (8, 32, 64)),
            ("experts.0.b_up", (8, 64)),
            ("experts.0.b_down", (8, 32)),
        ],
    ),
    "debug-capacity": (
        "debug-capacity.yaml",
        (),
        None,
        [
            ("router.weight", (8, 32)),
            ("router.expert_bias", (8,)),  # a buffer, see test_buffers_are_state_not_parameters
            ("experts.0.w_up", (8, 32, 32)),
            ("experts.0.w_gate", (8, 32, 32)),
            ("experts.0.w_down", (8, 32, 32)),
        ],
    ),
    "debug-groups.late": (
        "debug-groups.yaml",
        (),
        "late",
        [
            ("router.weight", (4, 32)),
            ("experts.0.w_up", (4, 128, 32)),
            ("experts.0.w_gate", (4, 128, 32)),
            ("experts.0.w_down", (4, 32, 128)),
        ],
    ),
    "sparsely-gated-tiny": (
        "sparsely-gated-moe.yaml",
        ("d_model=16", "layer.experts.routed.0.count=8", "layer.experts.routed.0.d_ff=24"),
        None,
        [
            ("router.weight", (8, 16)),
            ("router.noise_weight", (8, 16)),
            ("experts.0.w_up", (8, 24, 16)),
            ("experts.0.w_down", (8, 16, 24)),
            ("experts.0.b_up", (8, 24)),
            ("experts.0.b_down", (8, 16)),
        ],
    ),
}
CASES = list(CONTRACT)


def build(case: str, seed: int = 0, generator: torch.Generator | None = None) -> MoELayer:
    path, overrides, layer, _ = CONTRACT[case]
    return moespec.build(SPECS / path, overrides, layer=layer, seed=seed, generator=generator)


def x_for(m: MoELayer, t: int = 24) -> torch.Tensor:
    return torch.randn(t, m.d_model, generator=torch.Generator().manual_seed(t))


@pytest.mark.parametrize("case", CASES)
def test_state_dict_keys_and_shapes(case: str) -> None:
    m = build(case)
    got = [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert got == CONTRACT[case][3]
    assert all(v.dtype == torch.float32 for v in m.state_dict().values())
    # Nothing else leaks into the checkpoint: not the FX graphs, not the aux-loss module.
    assert not any(k.startswith(("aux.", "_graphs", "graph_module")) for k, _ in got)


@pytest.mark.parametrize("case", CASES)
def test_buffers_are_state_not_parameters(case: str) -> None:
    m = build(case)
    keys = [k for k, _ in CONTRACT[case][3]]
    params = [n for n, _ in m.named_parameters()]
    buffers = [n for n, _ in m.named_buffers()]
    assert buffers == [k for k in keys if k == "router.expert_bias"]
    assert params == [k for k in keys if k != "router.expert_bias"]
    assert all(p.requires_grad for p in m.parameters())
    for name in buffers:
        b = m.get_buffer(name)
        assert not b.requires_grad
        assert torch.count_nonzero(b) == 0  # the aux-loss-free bias starts at zero
        assert name in m.state_dict()  # persistent: it is training state to checkpoint


@pytest.mark.parametrize("case", CASES)
def test_load_state_dict_round_trip(case: str) -> None:
    a, b = build(case, seed=0), build(case, seed=1)
    sd = a.state_dict()
    if "router.expert_bias" in sd:  # a trained-looking bias (in a too: state_dict shares storage)
        sd["router.expert_bias"].copy_(torch.linspace(-0.2, 0.2, sd["router.expert_bias"].numel()))
    # Through bytes, as a checkpoint would go (weights_only: plain tensors, nothing pickled).
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    result = b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    for training in (False, True):
        a.train(training)
        b.train(training)
        a.generator, b.generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        x = x_for(a)
        assert torch.equal(a(x), b(x)), f"training={training}"
        assert torch.equal(a.aux_loss, b.aux_loss)


def test_load_state_dict_rejects_mismatches() -> None:
    m = build("debug-hetero")
    sd = m.state_dict()
    missing = {k: v for k, v in sd.items() if k != "shared.gate"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*shared\.gate"):
        m.load_state_dict(missing)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*router\.bias"):
        m.load_state_dict({**sd, "router.bias": torch.zeros(8)})
    with pytest.raises(RuntimeError, match=r"size mismatch for experts\.1\.w_up"):
        m.load_state_dict({**sd, "experts.1.w_up": torch.zeros(2, 95, 32)})


@pytest.mark.parametrize("case", CASES)
def test_seeded_init(case: str) -> None:
    a, b, c = build(case, seed=0), build(case, seed=0), build(case, seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), f"same seed, different {k}"
        if torch.count_nonzero(v) > 0:  # zero-initialised biases are equal for any seed
            assert not torch.equal(v, c.state_dict()[k]), f"seeds 0 and 1 give the same {k}"
        else:
            assert k.rsplit(".", 1)[1] in ("bias", "expert_bias", "b_up", "b_gate", "b_down"), k


def test_build_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    build("debug-hetero", seed=5)
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


DEBUG_LAYERS = [
    (path.name, name)
    for path in sorted(SPECS.glob("debug-*.yaml"))
    for name in [lay["name"] for lay in explain_data(moespec.load_spec(path))["layers"]]
]


@pytest.mark.parametrize("path,name", DEBUG_LAYERS)
def test_parameter_count_matches_explain(path: str, name: str) -> None:
    loaded = moespec.load_spec(SPECS / path)
    numbers = {lay["name"]: lay for lay in explain_data(loaded)["layers"]}
    m = moespec.build(loaded, layer=name if len(numbers) > 1 else None)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == numbers[name]["params_total"]


@pytest.mark.parametrize("case", ["sparsely-gated-tiny", "debug-base+router-bias"])
def test_parameter_count_matches_explain_with_overrides(case: str) -> None:
    path, overrides, _, _ = CONTRACT[case]
    (numbers,) = explain_data(moespec.load_spec(SPECS / path, overrides))["layers"]
    assert sum(p.numel() for p in build(case).parameters()) == numbers["params_total"]


# Every feature that owns a parameter is on, in two variants (a layer cannot have both
# jitter and noise; importance_load_cv2 needs noise).
ALL_FEATURES: dict[str, dict[str, Any]] = {
    "softmax-learned-noise": {
        "router": {
            "kind": "topk",
            "k": 3,
            "score": "softmax",
            "renormalize": True,
            "scaling_factor": 1.5,
            "temperature": 0.8,
            "bias": True,
            "noise": {"kind": "learned"},
            "groups": {"n_groups": 5, "topk_groups": 3, "group_score": "max"},
            "expert_bias": {"update_rate": 0.01},
        },
        "capacity": {"kind": "factor", "train_factor": 2.0, "eval_factor": 2.0, "drop_policy": "score"},
        "losses": {
            "load_balance": {"kind": "importance_load_cv2", "importance_weight": 0.1, "load_weight": 0.1},
            "z_loss": {"weight": 0.001},
        },
    },
    "sigmoid-jitter": {
        "router": {
            "kind": "topk",
            "k": 2,
            "score": "sigmoid",
            "renormalize": True,
            "scaling_factor": 2.5,
            "bias": True,
            "jitter": 0.05,
            "groups": {"n_groups": 5, "topk_groups": 3, "group_score": "top2_sum"},
            "expert_bias": {"update_rate": 0.01},
        },
        "capacity": {"kind": "factor", "train_factor": 1.5, "eval_factor": 2.0, "drop_policy": "random"},
        "losses": {
            "load_balance": {"kind": "switch", "weight": 0.01, "scope": "sequence"},
            "z_loss": {"weight": 0.001},
        },
    },
}


def all_features_spec(variant: str) -> dict[str, Any]:
    experts = {
        "routed": [
            {"kind": "glu", "activation": "silu", "d_ff": 24, "count": 2, "bias": True},
            {
                "kind": "mlp",
                "activation": "gelu_tanh",
                "d_ff": 32,
                "count": 2,
                "granularity": 2,
                "bias": True,
            },
        ],
        "shared": {"kind": "glu", "activation": "gelu", "d_ff": 16, "count": 2, "gate": True, "bias": True},
        "zero_compute": [{"kind": "zero"}, {"kind": "copy"}, {"kind": "constant", "count": 2}],
    }
    return {
        "moespec": 1,
        "name": "all-features",
        "d_model": 20,
        "layer": {"experts": experts, **ALL_FEATURES[variant]},
    }


@pytest.mark.parametrize("variant", list(ALL_FEATURES))
def test_every_parameter_gets_a_gradient(variant: str) -> None:
    m = moespec.build(all_features_spec(variant), generator=torch.Generator().manual_seed(0)).train()
    n_experts = 2 + 2 * 2 + 1 + 1 + 2
    assert m.router.weight.shape == (n_experts, 20)
    x = torch.randn(8, 32, 20, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = m(x)
    # Precondition: every expert was routed some token (else its slice rightly gets no gradient).
    assert bool((m.routing_stats["tokens_per_expert"] > 0).all()), m.routing_stats["tokens_per_expert"]
    assert float(m.aux_loss.detach()) > 0
    (y.square().mean() + m.aux_loss).backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert bool(p.grad.isfinite().all()), name
        # Per expert for stacked weights (dim 0 = experts), else the whole tensor.
        per = p.grad.reshape(p.shape[0], -1) if p.dim() >= 2 and not name.startswith("router.") else p.grad
        nonzero = per.abs().sum(-1) > 0 if per.dim() == 2 else per.abs().sum() > 0
        assert bool(torch.as_tensor(nonzero).all()), f"{name}: a slice got zero gradient"
    assert m.router.expert_bias.grad is None


# --- tensors replaced rather than written in place ----------------------------------------
# The generated forward reads parameters and buffers from the MoELayer at call time. (An
# earlier layer ran GraphModules that had copied references to the build-time tensors, so
# these silently kept computing with the old weights / expert bias.)


@pytest.mark.parametrize("case", ["debug-tiny", "debug-capacity"])
def test_load_state_dict_assign(case: str) -> None:
    a, b = build(case, seed=0).eval(), build(case, seed=1).eval()
    b.load_state_dict(a.state_dict(), assign=True)  # the meta-device init recipe's last step
    x = x_for(a)
    torch.testing.assert_close(b(x), a(x))


def test_to_empty_then_load_state_dict() -> None:
    a, b = build("debug-capacity", seed=0).eval(), build("debug-capacity", seed=1).eval()
    with torch.no_grad():
        a.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))  # changes the selection
    b.to_empty(device="cpu")  # parameters keep their identity; the expert_bias buffer does not
    b.load_state_dict(a.state_dict())
    x = x_for(a)
    assert torch.equal(b(x), a(x))
    assert b.routing_stats["routed_per_expert"].tolist() == a.routing_stats["routed_per_expert"].tolist()


def test_deepcopy_before_forward_is_independent() -> None:
    a = build("debug-capacity").eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.router.weight.mul_(3.0)
    x = x_for(a)
    ref = build("debug-capacity").eval()
    torch.testing.assert_close(a(x), ref(x))  # the copy's weights are its own
    assert not torch.allclose(b(x), a(x))


def test_deepcopy_after_forward() -> None:
    a = build("debug-tiny").train()
    a(x_for(a))  # e.g. an EMA / teacher copy taken during training
    b = copy.deepcopy(a)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)


def test_whole_module_pickles() -> None:
    a = build("debug-capacity").eval()
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    b = torch.load(buf, weights_only=False)
    x = x_for(a)
    assert torch.equal(b(x), a(x))
