"""``moespec tune`` under the interpreter (the times mean nothing there; the mechanics are
what is tested): candidates run, the best is written to the table, the kernels then read it,
and a table entry takes precedence over the built-in one."""

from __future__ import annotations

import json
from pathlib import Path

from moespec.codegen import tuning
from moespec.codegen.tuning import Blocks
from moespec.tune import tune

SPECS = Path(__file__).resolve().parents[2] / "specs"
TRITON = ("target.backend=triton", "target.device=cpu", "target.dtype=fp32")


def test_tune_writes_the_best_candidate_and_the_kernels_use_it(tmp_path: Path, monkeypatch):
    table = tmp_path / "tuning.json"
    cands = (Blocks(16, 32, 16, 1, 1), Blocks(32, 32, 16, 1, 1))
    res = tune(str(SPECS / "debug-tiny.yaml"), TRITON, tokens=8, repeat=1, candidates=cands, table=table)
    assert res.arch == "interpret" and set(res.times_ms) == set(cands) and res.best in cands
    entry = json.loads(table.read_text())["interpret"][res.key]
    assert entry["blocks"] == list(
        map(int, (res.best.m, res.best.n, res.best.k, res.best.warps, res.best.stages))
    )
    monkeypatch.setenv("MOESPEC_TUNING", str(table))
    assert tuning.blocks("interpret", 32, 8, 4) == res.best  # the table's entry, not the built-in one
