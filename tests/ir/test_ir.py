"""Spec -> IR: stable printed form, index assignment, placement maps, verifier."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from moespec import load_spec
from moespec.ir.build import build_program, expert_to_rank, spec_hash
from moespec.ir.printer import print_program
from moespec.ir.verify import IRError, verify

SPECS = Path(__file__).resolve().parents[2] / "specs"

HETERO = {
    "moespec": 1,
    "name": "h",
    "d_model": 16,
    "layer": {
        "experts": {
            "routed": [
                {"count": 2, "kind": "glu", "activation": "silu", "d_ff": 32},
                {"count": 1, "kind": "mlp", "activation": "gelu", "d_ff": 24, "bias": True, "granularity": 2},
            ],
            "shared": {"count": 2, "kind": "glu", "activation": "silu", "d_ff": 8, "gate": True},
            "zero_compute": [{"kind": "zero"}, {"kind": "constant", "count": 2}],
        },
        "router": {"kind": "topk", "k": 2},
    },
    "placement": {"expert_parallel": 2, "mapping": "round_robin"},
}

EXPECTED = """\
layer layer x1  d_model=16 dtype=fp32
  router    E=7 dtype=fp32 topk(k=2 score=softmax order=softmax_then_topk renormalize=false \
scaling_factor=1.0 temperature=1.0 bias=false jitter=0.0 gating_residual=false trainable=true \
second_expert_policy=all)
  dispatch  rows<=T*2 capacity=dropless()
  experts   [0..1] glu(silu) 16->32->16 bias=false
  experts   [2..3] mlp(gelu) 16->12->16 bias=true
  experts   [4..4] zero
  experts   [5..6] constant
  shared    glu(silu) 16->16->16 bias=false gate=true
  combine   weighted_sum
  losses    load_balance=none z_loss=none
  placement ep=2 ranks=[0,1,0,1]
"""


def test_printed_ir_is_stable():
    program = build_program(load_spec(HETERO).spec)
    text = print_program(program)
    assert text.splitlines()[0].startswith(f"program h spec={spec_hash(load_spec(HETERO).spec)[:12]}")
    assert "\n".join(text.splitlines()[1:]) + "\n" == EXPECTED


def test_mapping_kinds():
    assert expert_to_rank("contiguous", 8, 2) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert expert_to_rank("round_robin", 4, 2) == (0, 1, 0, 1)
    assert expert_to_rank([1, 0], 2, 2) == (1, 0)


def test_every_example_spec_lowers_to_verified_ir():
    for path in sorted(SPECS.glob("*.yaml")):
        program = build_program(load_spec(path).spec)
        assert program.layers, path


def test_verifier_catches_broken_ir():
    program = build_program(load_spec(HETERO).spec)
    layer = program.layers[0]
    bad_groups = (dataclasses.replace(layer.experts.groups[0], first=1), *layer.experts.groups[1:])
    bad = dataclasses.replace(layer, experts=dataclasses.replace(layer.experts, groups=bad_groups))
    with pytest.raises(IRError, match="contiguous"):
        verify(dataclasses.replace(program, layers=(bad,)))
    with pytest.raises(IRError, match="at least one layer"):
        verify(dataclasses.replace(program, layers=()))


def test_hash_changes_with_the_spec():
    a = load_spec(HETERO).spec
    b = load_spec(HETERO, ["layer.router.k=1"]).spec
    assert spec_hash(a) != spec_hash(b) and spec_hash(a) == spec_hash(load_spec(HETERO).spec)
