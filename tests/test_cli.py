"""The command line: exit codes, output streams, --json, init, schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

from moespec.cli import main
from moespec.resources import schema_path
from moespec.spec.jsonschema import json_schema_text

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = str(ROOT / "specs" / "mixtral-8x7b.yaml")


def test_validate_ok_and_json(capsys):
    assert main(["validate", MIXTRAL]) == 0
    assert "ok (mixtral-8x7b)" in capsys.readouterr().out
    assert main(["validate", MIXTRAL, "layer.router.k=0", "--json"]) == 1
    (res,) = json.loads(capsys.readouterr().out)
    assert res["ok"] is False and res["errors"][0]["path"] == "layer.router.k"
    assert res["errors"][0]["file"] == "<cli>"


def test_validate_reports_every_file(capsys, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("moespec: 1\n")
    assert main(["validate", str(bad), MIXTRAL, str(tmp_path / "missing.yaml")]) == 1
    out = capsys.readouterr()
    assert "ok (mixtral-8x7b)" in out.out
    assert "missing.yaml:1:1: file not found" in out.err
    assert "the spec needs a `name:` key" in out.err


def test_explain_json_layers(capsys):
    assert main(["explain", MIXTRAL, "layer.router.k=1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (layer,) = data["layers"]
    assert layer["params_total"] == 8 * 3 * 4096 * 14336 + 4096 * 8
    assert layer["params_active"] == 1 * 3 * 4096 * 14336 + 4096 * 8
    assert layer["flops_per_token"] == 2 * (3 * 4096 * 14336 + 4096 * 8)
    assert data["provenance"]["layer.router.k"].startswith("<cli>:1:")
    assert data["provenance"]["layer.router.temperature"] == "default"


def test_explain_text_shows_provenance(capsys):
    assert main(["explain", MIXTRAL]) == 0
    out = capsys.readouterr().out
    assert "layer.router.k: 2" in out and "mixtral-8x7b.yaml:19:8" in out
    assert "1,409,318,912" in out


def test_explain_needs_one_spec(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["explain", MIXTRAL, MIXTRAL])
    assert ei.value.code == 2


def test_schema_prints_the_committed_schema(capsys, tmp_path: Path):
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == json_schema_text()
    assert main(["schema", "-o", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == json_schema_text()


def test_init_writes_a_valid_spec_and_refuses_to_overwrite(capsys, tmp_path: Path):
    out = tmp_path / "my moe.yaml"
    assert main(["init", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    assert _modeline_schema(out) == schema_path().resolve()
    assert main(["validate", str(out)]) == 0
    assert main(["init", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["init", str(out), "--force", "--schema", "https://x/s.json", "--name", "n"]) == 0
    assert out.read_text().startswith("# yaml-language-server: $schema=https://x/s.json")
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def _modeline_schema(spec: Path) -> Path:
    """The file a spec's modeline names, resolved as yaml-language-server does: a URI as it
    is, a plain path relative to the spec's directory."""
    ref = spec.read_text().splitlines()[0].split("$schema=")[1]
    if ref.startswith("file://"):
        return Path(url2pathname(urlparse(ref).path))
    return (spec.parent / ref).resolve()


def test_init_modeline_survives_moving_the_file(tmp_path: Path):
    out = tmp_path / "a" / "moe.yaml"
    assert main(["init", str(out)]) == 0
    moved = tmp_path / "elsewhere" / "deeper" / "renamed.yaml"
    moved.parent.mkdir(parents=True)
    out.rename(moved)
    assert _modeline_schema(moved) == schema_path().resolve()
    assert _modeline_schema(moved).is_file()


def test_usage_error_exit_code():
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2


def test_python_m_entry_point_and_no_traceback(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00binary")
    r = subprocess.run(
        [sys.executable, "-m", "moespec", "validate", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stdout == ""
    assert "Traceback" not in r.stderr and "bad.yaml:1:1:" in r.stderr


@pytest.mark.parametrize("command", ["validate", "explain", "build"])
def test_override_without_value_is_named(capsys, tmp_path: Path, command: str) -> None:
    # `layer.router.k` (the `=` forgotten) is neither a file nor read as one.
    extra = ["-o", str(tmp_path / "out")] if command == "build" else []
    with pytest.raises(SystemExit) as ei:
        main([command, MIXTRAL, "layer.router.k", *extra])
    assert ei.value.code == 2
    err = capsys.readouterr()
    assert "'layer.router.k' looks like an override without a value: write layer.router.k=VALUE" in err.err
    assert "ok (" not in err.out
    assert not (tmp_path / "out").exists()


def test_a_missing_spec_file_is_still_not_found(capsys, tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "gone.yaml")]) == 1
    assert "gone.yaml:1:1: file not found" in capsys.readouterr().err


def test_multi_group_build_names_the_flag(capsys, tmp_path: Path) -> None:
    assert main(["build", str(ROOT / "specs" / "debug-groups.yaml"), "-o", str(tmp_path / "o")]) == 1
    assert "`--layer NAME` on the command line" in capsys.readouterr().err


def test_bench_infer_prints_the_decode_to_prefill_table(capsys):
    tiny = str(Path(__file__).resolve().parents[1] / "specs" / "debug-tiny.yaml")
    assert main(["bench", tiny, "--infer", "--repeat", "1", "--warmup", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in res["passes"]]
    assert names == ["forward, 1 token"] + [f"forward, {t} tokens" for t in (8, 64, 256, 2048)]
    assert all(p["median_s"] > 0 for p in res["passes"])
    assert main(["bench", tiny, "--infer", "--nproc", "2"]) == 2
    assert "--infer runs in one process" in capsys.readouterr().err
