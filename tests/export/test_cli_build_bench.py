"""`moespec build` and `moespec bench` on the command line: exit codes, output, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moespec
from moespec.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "specs" / "debug-tiny.yaml")
GROUPS = str(ROOT / "specs" / "debug-groups.yaml")


def test_build_writes_and_summarises(capsys, tmp_path: Path):
    out = tmp_path / "art"
    assert main(["build", TINY, "layer.router.k=1", "-o", str(out), "--seed", "2"]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}/: graph.txt, ir.txt, manifest.json, model.safetensors" in stdout
    assert "params total            24,704 (24.7K)" in stdout and "flops per token" in stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 2 and m["source"]["overrides"] == ["layer.router.k=1"]
    assert moespec.load(out).ir.router.config.k == 1


def test_build_invalid_spec_is_compiler_style(capsys, tmp_path: Path):
    out = tmp_path / "art"
    assert main(["build", TINY, "layer.router.k=0", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("<cli>:1:16: layer.router.k: Input should be greater than 0")
    assert "1 error found" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("moespec: 1\nname: x\nd_model: 32\nlayer:\n  router: {kind: topk, k: 2}\n")
    assert main(["build", str(bad), "-o", str(out)]) == 1
    assert f"{bad}:4:1: layer.experts:" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_build_errors_exit_1(capsys, tmp_path: Path):
    out = tmp_path / "art"
    assert main(["build", GROUPS, "-o", str(out)]) == 1
    assert "moespec: error: the spec has layer groups ['early', 'late']" in capsys.readouterr().err
    assert main(["build", GROUPS, "--layer", "nope", "-o", str(out)]) == 1
    assert "moespec: error: no layer group 'nope'" in capsys.readouterr().err
    assert main(["build", GROUPS, "--layer", "early", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["build", GROUPS, "--layer", "late", "-o", str(out)]) == 1
    assert "already exists (pass --force to replace it)" in capsys.readouterr().err
    assert main(["build", GROUPS, "--layer", "late", "-o", str(out), "--force"]) == 0
    assert moespec.load(out).ir.name == "late"


def test_build_usage_errors(capsys, tmp_path: Path):
    assert main(["build", TINY, TINY, "-o", str(tmp_path / "a")]) == 2
    assert "exactly one spec file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        main(["build", TINY])  # -o is required
    assert ei.value.code == 2


def test_bench_prints_a_table(capsys):
    args = ["bench", TINY, "d_model=16", "--tokens", "16", "--repeat", "1", "--warmup", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "debug-tiny/layer on cpu" in out and "16 tokens x d_model 16" in out
    for word in ("pass", "tokens/s", "achieved FLOP/s", "forward+backward", "FLOP/s"):
        assert word in out


def test_bench_json_and_artifact_dir(capsys, tmp_path: Path):
    out = tmp_path / "art"
    assert main(["build", TINY, "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--tokens", "16", "--repeat", "2", "--warmup", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["spec_name"] == "debug-tiny" and res["tokens"] == 16
    fwd, fwdbwd = res["passes"]
    assert (fwd["name"], fwdbwd["name"]) == ("forward", "forward+backward")
    assert len(fwd["times_s"]) == 2 and fwd["tokens_per_s"] > 0
    # achieved FLOP/s = FLOPs/token x tokens / median time; fwd+bwd counts 3x
    assert fwdbwd["flop_per_s"] == pytest.approx(3 * res["flops_per_token"] * 16 / fwdbwd["median_s"])


def test_bench_errors(capsys, tmp_path: Path):
    assert main(["bench", TINY, "--tokens", "0"]) == 2
    assert main(["bench", TINY, "layer.router.k=9", "--tokens", "4", "--repeat", "1"]) == 1
    assert "layer.router.k" in capsys.readouterr().err
    assert main(["bench", TINY, "--device", "cpux", "--tokens", "4", "--repeat", "1"]) == 1
    assert "moespec: error: unknown device 'cpux'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--tokens", "4"]) == 1  # a directory, not an artifact
