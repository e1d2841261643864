"""Runs ``tests/triton_interp`` (the generated Triton kernels and triton layers) in a separate
pytest process under Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before triton
is imported, which this process may already have done."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_the_interpreter(tmp_path: Path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "MOESPEC_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-o",
        "addopts=",
        "-q",
        "--import-mode=importlib",
        "-p",
        "no:cacheprovider",
    ]
    cmd.append(str(HERE / "triton_interp"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
