"""`pip install .` into a clean venv ships schemas/, specs/ and templates/ and runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_data_into_a_clean_venv(tmp_path: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("moespec-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    # Dependencies come from this test environment's site-packages (PYTHONPATH does not
    # process .pth files, so the editable checkout is not visible: moespec is the wheel's).
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    code = (
        "import moespec, moespec.resources as r;"
        "print(moespec.__file__);"
        "print(r.schema_path());"
        "print(sorted(p.name for p in r.data_dir('specs').glob('*.yaml')));"
        "print(r.data_dir('templates'))"
    )
    out = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    mod_file, schema, specs, templates = out.stdout.splitlines()
    assert str(env_dir) in mod_file, "imported the checkout, not the installed wheel"
    assert Path(schema).is_file() and "_data" in schema
    assert "mixtral-8x7b.yaml" in specs and Path(templates).is_dir()
    installed_spec = Path(schema).parents[1] / "specs" / "mixtral-8x7b.yaml"
    val = subprocess.run(
        [py, "-m", "moespec", "validate", str(installed_spec)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert val.returncode == 0, val.stderr
