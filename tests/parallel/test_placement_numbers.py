"""``moespec explain`` for expert parallelism: each rank's experts and weights, the all-to-all
bytes, and the imbalance warning, against hand-computed values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moespec.ir.placement import placement_numbers
from moespec.spec.load import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


def numbers(*overrides: str, spec: str = "debug-tiny.yaml", tokens: int = 4096):
    return placement_numbers(load_spec(SPECS / spec, list(overrides)).spec, tokens)


def test_single_rank_has_no_placement() -> None:
    assert numbers() == []


def test_contiguous_and_round_robin_by_hand() -> None:
    # debug-tiny: D 32, 4 SwiGLU experts of width 64 (3·32·64 = 6144 params each), k 2, fp32.
    (pn,) = numbers("placement.expert_parallel=2")
    assert [r.experts for r in pn.ranks] == [(0, 1), (2, 3)]
    assert [r.routed_params for r in pn.ranks] == [12288, 12288]
    # 4096 tokens · 2 rows · 32 wide · 4 bytes, out and back, half of them leave the rank.
    assert pn.all_to_all_bytes_forward == 2 * 4096 * 2 * 32 * 4 // 2 == 1_048_576
    assert pn.all_to_all_bytes_train_step == 2 * pn.all_to_all_bytes_forward
    assert pn.warning is None
    (rr,) = numbers("placement.expert_parallel=2", "placement.mapping=round_robin", tokens=10)
    assert [r.experts for r in rr.ranks] == [(0, 2), (1, 3)]
    assert rr.all_to_all_bytes_forward == 2 * 10 * 2 * 32 * 4 // 2
    # weights per rank: the routed share plus the replicated router (4 x 32 fp32)
    assert rr.ranks[0].weight_bytes == (12288 + 4 * 32) * 4


def test_unbalanced_widths_warn() -> None:
    wide = (
        "layer.experts.routed=[{count: 2, kind: glu, activation: silu, d_ff: 64},"
        " {count: 2, kind: glu, activation: silu, d_ff: 256}]"
    )
    (pn,) = numbers(wide, "placement.expert_parallel=2")
    assert [r.routed_params for r in pn.ranks] == [2 * 3 * 32 * 64, 2 * 3 * 32 * 256]
    assert pn.warning is not None and "unequal routed weights" in pn.warning
    (mixed,) = numbers(wide, "placement.expert_parallel=2", "placement.mapping=[0, 1, 0, 1]")
    assert mixed.warning is None


def test_explain_cli_prints_placement() -> None:
    cmd = [
        sys.executable,
        "-m",
        "moespec",
        "explain",
        str(SPECS / "debug-tiny.yaml"),
        "placement.expert_parallel=2",
    ]
    out = subprocess.run(
        [*cmd, "--json", "--tokens", "100"], capture_output=True, text=True, check=True
    ).stdout
    (pn,) = json.loads(out)["placement"]
    assert pn["tokens_per_rank"] == 100 and pn["all_to_all_bytes_forward"] == 2 * 100 * 2 * 32 * 4 // 2
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "expert parallelism of 'layer' over 2 ranks" in text
