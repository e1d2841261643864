"""The parameter counts `moespec explain` prints equal what the built module holds.

For a matrix of feature combinations (FFN kinds with and without biases, fine-grained and
heterogeneous experts, shared experts with and without gate and biases, every zero-compute
kind, multi-head with and without biases, and every router kind with its parameter-bearing
options), the numbers of ``moespec explain SPEC --json`` (the CLI's contract, run in-process)
must equal the ``named_parameters`` of ``moespec.build(spec)`` summed by prefix:

    params_router = router.*    params_routed = experts.*    params_shared = shared.*
    params_zero_compute = zero_compute.*    params_total = all (multi_head.* only there)

Buffers (a frozen router, the aux-loss-free expert bias, a hash table) are not parameters.
FLOPs per token are checked against a hand count where the shared experts' gate adds to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import moespec
from moespec.cli import main

D = 8  # d_model
F = 6  # routed d_ff

PREFIXES = {
    "router": "params_router",
    "experts": "params_routed",
    "shared": "params_shared",
    "zero_compute": "params_zero_compute",
    "multi_head": None,  # only in params_total
}


def _ffn(kind: str, d_ff: int = F, *, bias: bool = False, **extra: Any) -> dict[str, Any]:
    activation = "silu" if kind == "glu" else "gelu"
    return {"kind": kind, "activation": activation, "d_ff": d_ff, "bias": bias, **extra}


def _spec(
    router: dict[str, Any] | None = None,
    *,
    routed: list[dict[str, Any]] | None = None,
    shared: dict[str, Any] | None = None,
    zero_compute: list[dict[str, Any]] | None = None,
    **layer: Any,
) -> dict[str, Any]:
    experts: dict[str, Any] = {"routed": routed or [{"count": 4, **_ffn("glu")}]}
    if shared is not None:
        experts["shared"] = shared
    if zero_compute is not None:
        experts["zero_compute"] = zero_compute
    return {
        "moespec": 1,
        "name": "numbers",
        "d_model": D,
        "layer": {"experts": experts, "router": router or {"kind": "topk", "k": 2}, **layer},
    }


ALL_ZERO_COMPUTE = [{"kind": "zero"}, {"kind": "copy"}, {"kind": "constant", "count": 2}]
CUSTOM = "moespec.examples.custom_router:softmax_topk"

COMBOS: dict[str, dict[str, Any]] = {
    # routed experts
    "mlp": _spec(routed=[{"count": 4, **_ffn("mlp")}]),
    "mlp_bias": _spec(routed=[{"count": 4, **_ffn("mlp", bias=True)}]),
    "glu": _spec(routed=[{"count": 4, **_ffn("glu")}]),
    "glu_bias": _spec(routed=[{"count": 4, **_ffn("glu", bias=True)}]),
    "glu_bias_fine_grained": _spec(routed=[{"count": 2, "granularity": 2, **_ffn("glu", 12, bias=True)}]),
    "heterogeneous": _spec(
        routed=[{"count": 2, **_ffn("mlp", 10, bias=True)}, {"count": 3, **_ffn("glu", 4, bias=True)}]
    ),
    # shared experts
    "shared_mlp": _spec(shared=_ffn("mlp", 5)),
    "shared_mlp_bias_gate": _spec(shared={"count": 2, **_ffn("mlp", 5, bias=True, gate=True)}),
    "shared_glu_gate": _spec(shared=_ffn("glu", 5, gate=True)),
    "shared_glu_bias": _spec(shared={"count": 2, **_ffn("glu", 5, bias=True)}),
    "shared_glu_bias_gate": _spec(shared=_ffn("glu", 5, bias=True, gate=True)),
    # zero-compute experts
    "zero_compute_each_kind": _spec(zero_compute=ALL_ZERO_COMPUTE),
    "zero_compute_constant": _spec({"kind": "topk", "k": 1}, zero_compute=[{"kind": "constant", "count": 3}]),
    # multi-head
    "multi_head_bias": _spec(multi_head={"heads": 2, "bias": True}),
    "multi_head_no_bias": _spec(multi_head={"heads": 2, "bias": False}),
    "multi_head_everything": _spec(
        {"kind": "topk", "k": 2, "bias": True, "noise": {"kind": "learned"}},
        routed=[{"count": 4, **_ffn("glu", bias=True)}],
        shared={"count": 2, **_ffn("glu", 5, bias=True, gate=True)},
        zero_compute=ALL_ZERO_COMPUTE,
        multi_head={"heads": 4},
    ),
    # the top-k router's parameter-bearing options
    "topk_bias": _spec({"kind": "topk", "k": 2, "bias": True}),
    "topk_learned_noise": _spec({"kind": "topk", "k": 2, "noise": {"kind": "learned"}}),
    "topk_fixed_noise": _spec({"kind": "topk", "k": 2, "noise": {"kind": "fixed", "std": 0.1}}),
    "topk_expert_bias": _spec({"kind": "topk", "k": 2, "expert_bias": {}}),
    "topk_gating_residual": _spec({"kind": "topk", "k": 2, "gating_residual": True}),
    "topk_frozen": _spec({"kind": "topk", "k": 2, "trainable": False}),
    "topk_frozen_bias_residual": _spec(
        {"kind": "topk", "k": 2, "trainable": False, "bias": True, "gating_residual": True}
    ),
    "topk_everything": _spec(
        {
            "kind": "topk",
            "k": 2,
            "bias": True,
            "noise": {"kind": "learned"},
            "expert_bias": {},
            "gating_residual": True,
            "groups": {"n_groups": 2, "topk_groups": 1},
        },
        shared=_ffn("glu", 5, bias=True, gate=True),
        zero_compute=ALL_ZERO_COMPUTE,
    ),
    # every other router kind
    "adaptive_gating": _spec({"kind": "adaptive_gating"}),
    "base": _spec({"kind": "base"}),
    "cosine": _spec({"kind": "cosine", "k": 2, "proj_dim": 3}),
    "cosine_learnable_temperature": _spec(
        {"kind": "cosine", "k": 2, "proj_dim": 3, "learnable_temperature": True}
    ),
    "custom": _spec({"kind": "custom", "function": CUSTOM, "output": "topk", "k": 2}),
    "dselect_k": _spec({"kind": "dselect_k", "k": 2}),
    "expert_choice": _spec({"kind": "expert_choice"}),
    "expert_choice_bias": _spec({"kind": "expert_choice", "bias": True}),
    "hash": _spec({"kind": "hash", "vocab_size": 50}),
    "relu": _spec({"kind": "relu", "k": 2}),
    "sinkhorn": _spec({"kind": "sinkhorn"}),
    "soft_moe": _spec({"kind": "soft_moe", "group_size": 8, "slots_per_expert": 2}),
    "top_p": _spec({"kind": "top_p"}),
}


def explain_json(spec: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """The first layer of ``moespec explain SPEC --json`` (the CLI, in-process)."""
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")  # JSON is YAML 1.2
    capsys.readouterr()
    assert main(["explain", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["layers"][0]


def module_counts(spec: dict[str, Any]) -> dict[str, int]:
    """The built module's parameter elements, by explain's field (``params_total``: all)."""
    counts = dict.fromkeys(["params_total", *filter(None, PREFIXES.values())], 0)
    for name, p in moespec.build(spec, seed=0).named_parameters():
        prefix = name.split(".")[0]
        assert prefix in PREFIXES, f"parameter {name} is in no explain field; add its prefix here"
        counts["params_total"] += p.numel()
        if PREFIXES[prefix] is not None:
            counts[PREFIXES[prefix]] += p.numel()
    return counts


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_params_equal_the_module(combo: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = COMBOS[combo]
    numbers = explain_json(spec, tmp_path, capsys)
    counts = module_counts(spec)
    assert {k: numbers[k] for k in counts} == counts


def _macs(kind: str, d_ff: int) -> int:
    return (3 if kind == "glu" else 2) * D * d_ff


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_shared_gate_flops(kind: str, gate: bool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """FLOPs/token by hand: 2·(router D·E + k routed FFNs + the shared FFNs + the gate's D)."""
    spec = _spec(shared={"count": 2, **_ffn(kind, 5, bias=True, gate=gate)})
    numbers = explain_json(spec, tmp_path, capsys)
    e, k = 4, 2
    macs = D * e + k * _macs("glu", F) + 2 * _macs(kind, 5) + (D if gate else 0)
    assert numbers["flops_per_token"] == 2 * macs


def _kinds_used() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"router": set(), "zero_compute": set(), "noise": set()}
    for spec in COMBOS.values():
        layer = spec["layer"]
        out["router"].add(layer["router"]["kind"])
        out["noise"] |= {layer["router"]["noise"]["kind"]} if "noise" in layer["router"] else set()
        out["zero_compute"] |= {z["kind"] for z in layer["experts"].get("zero_compute", [])}
    return out


def test_matrix_has_every_kind(capsys: pytest.CaptureFixture) -> None:
    """Every router, noise and zero-compute kind of the schema (``moespec schema``) is in COMBOS."""
    capsys.readouterr()
    assert main(["schema"]) == 0
    defs = json.loads(capsys.readouterr().out)["definitions"]
    schema = {
        "router": set(defs["LayerSpec"]["properties"]["router"]["discriminator"]["mapping"]),
        "noise": set(defs["TopKRouter"]["properties"]["noise"]["anyOf"][0]["discriminator"]["mapping"]),
        "zero_compute": set(defs["ZeroComputeExperts"]["properties"]["kind"]["enum"]),
    }
    assert _kinds_used() == schema
