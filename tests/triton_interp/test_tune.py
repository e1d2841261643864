"""``moespec tune`` under the interpreter (the times mean nothing there; the mechanics are
what is tested): candidates run for all kernel roles and role by role, the best are written
to the table, the kernels then read them, and table entries take precedence over the built-in
ones in the documented order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moespec.codegen import tuning
from moespec.codegen.tuning import Blocks
from moespec.ops import _expert_triton
from moespec.tune import ALL, tune

SPECS = Path(__file__).resolve().parents[2] / "specs"
TRITON = ("target.backend=triton", "target.device=cpu", "target.dtype=fp32")
CANDS = (Blocks(16, 32, 16, 1, 1), Blocks(32, 32, 16, 1, 1))


def test_tune_writes_the_best_candidates_and_the_kernels_use_them(tmp_path: Path, monkeypatch):
    table = tmp_path / "tuning.json"
    res = tune(str(SPECS / "debug-tiny.yaml"), TRITON, tokens=8, repeat=1, candidates=CANDS, table=table)
    assert res.arch == "interpret" and res.best[ALL] in CANDS
    assert {r for r, _ in res.times_ms} == {ALL, *tuning.ROLES}  # both passes ran every candidate
    assert all(len([b for r, b in res.times_ms if r == role]) == 2 for role in (ALL, *tuning.ROLES))
    data = json.loads(table.read_text())["interpret"]
    assert data[res.key]["blocks"] == [res.best[ALL].m, res.best[ALL].n, res.best[ALL].k, 1, 1]
    for role in tuning.ROLES:  # a role entry exactly where the role pass beat the generic tile
        assert (f"{res.key}/{role}" in data) == (role in res.best)
    monkeypatch.setenv("MOESPEC_TUNING", str(table))
    for role in tuning.ROLES:
        want = res.best.get(role) or tuning._generic(res.best[ALL], role)
        assert tuning.blocks("interpret", 32, 8, 4, role=role) == want  # the table's, not the built-in


def test_lookup_order_and_the_kernels_read_their_role(tmp_path: Path, monkeypatch):
    """user role entry > user generic > built-in role > built-in generic; a forced role
    reaches exactly that role's kernel launches."""
    table = tmp_path / "t.json"
    tuning.write_entry("interpret", "32/small", Blocks(32, 64, 16, 1, 1), {}, table)
    tuning.write_entry("interpret", "32/small/wgrad", Blocks(16, 16, 32, 1, 1), {}, table)
    monkeypatch.setenv("MOESPEC_TUNING", str(table))
    assert tuning.blocks("interpret", 32, 8, 4, role="wgrad") == Blocks(16, 16, 32, 1, 1)
    assert tuning.blocks("interpret", 32, 8, 4, role="up") == Blocks(32, 64, 16, 1, 1)
    assert tuning.blocks("interpret", 32, 8, 4, role="rows") == Blocks(32, 64, 16, 1, 1)
    monkeypatch.setitem(tuning._TABLES["interpret"], "32/large/rows", Blocks(32, 32, 16, 1, 1))
    assert tuning.blocks("interpret", 32, 4096, 4, role="rows") == Blocks(32, 32, 16, 1, 1)
    assert tuning.blocks("interpret", 32, 4096, 4, role="wgrad") == Blocks(32, 32, 16, 1, 1)  # n x n
    seen: list[tuple[str, Blocks]] = []
    real = tuning.blocks

    def spy(*a, role: str = "up"):
        b = real(*a, role=role)
        seen.append((role, b))
        return b

    monkeypatch.setattr(tuning, "blocks", spy)
    with tuning.forced({"down_bwd": Blocks(16, 16, 16, 1, 1)}):
        import moespec

        layer = moespec.build(str(SPECS / "debug-tiny.yaml"), list(TRITON))
        x = __import__("torch").randn(5, layer.d_model, requires_grad=True)
        layer(x).sum().backward()
    assert {r for r, _ in seen} == set(tuning.ROLES)
    assert {b for r, b in seen if r == "down_bwd"} == {Blocks(16, 16, 16, 1, 1)}
    assert _expert_triton.LAUNCHES["expert_down_backward"] > 0


@pytest.mark.parametrize(("rows", "experts", "bucket"), [(64, 1, "small"), (65, 1, "mid"), (513, 1, "large")])
def test_buckets(rows, experts, bucket):
    assert tuning.table_key(16, rows, experts) == f"16/{bucket}"


def test_bad_table_key_is_an_error_naming_the_file(tmp_path: Path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"sm90": {"16/large/nope": {"blocks": [1, 2, 3, 4, 5]}}}))
    with pytest.raises(ValueError, match=r"t\.json: not a moespec tuning table"):
        tuning.read_user_table(table)


def test_role_pass_holds_the_others_and_stale_role_entries_go(tmp_path: Path, monkeypatch):
    """A role entry left by an earlier run neither leaks into this run's role pass nor
    survives it: the generic entry written replaces it (unless this run writes the role)."""
    table = tmp_path / "tuning.json"
    stale = Blocks(16, 16, 16, 1, 1)
    tuning.write_entry("interpret", "32/small/up", stale, {}, table)
    monkeypatch.setenv("MOESPEC_TUNING", str(table))
    seen: list[tuple[str, Blocks]] = []
    real = tuning.blocks

    def spy(*a, role: str = "up"):
        b = real(*a, role=role)
        seen.append((role, b))
        return b

    monkeypatch.setattr(tuning, "blocks", spy)
    res = tune(str(SPECS / "debug-tiny.yaml"), TRITON, tokens=8, repeat=1, candidates=CANDS, table=table)
    n_first = next(i for i, (role, b) in enumerate(seen) if b in CANDS)  # the default step ran first
    assert stale not in {b for _, b in seen[n_first:]}  # every timed step: candidates or the best
    data = json.loads(table.read_text())["interpret"]
    assert ("32/small/up" in data) == ("up" in res.best)
    monkeypatch.setattr(tuning, "blocks", real)
    want = res.best.get("up") or tuning._generic(res.best[ALL], "up")
    assert tuning.blocks("interpret", 32, 8, 4, role="up") == want
