"""Nothing half-written, ever (issue 19 §3): a build killed at a point it reports leaves no
temporary folder (SIGTERM) or one the next build removes (SIGKILL); a previous artifact
stranded between two renames goes back; the swap itself is atomic where Linux allows it.

The child process stops where the artifact's files are written and not yet swapped in,
says so on stdout, and waits for the test's signal (no sleeps in the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import moespec
from moespec.export import swap

SPEC = Path(__file__).resolve().parents[2] / "specs" / "debug-tiny.yaml"

CHILD = """
import signal, sys
import moespec.export.artifact as artifact
from moespec.cli import main

real = artifact.swap_into_place
def stop_then_swap(tmp, out):
    print("files-written", flush=True)
    signal.pause()  # until the test's signal
    real(tmp, out)
artifact.swap_into_place = stop_then_swap
sys.exit(main(sys.argv[1:]))
"""


def seed_of(art: Path) -> int:
    return json.loads((art / "manifest.json").read_text())["seed"]


def leftovers(art: Path) -> list[str]:
    return sorted(p.name for p in art.parent.iterdir() if p.name.startswith(f".{art.name}."))


def start_build(art: Path, seed: int) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, "build", str(SPEC), "-o", str(art), "--force", "--seed", str(seed)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "files-written", child.stderr.read() if child.stderr else ""
    return child


@pytest.fixture
def art(tmp_path: Path) -> Path:
    out = tmp_path / "art"
    moespec.build_artifact(SPEC, out, seed=0)
    return out


def test_sigterm_cleans_up_and_keeps_the_previous_artifact(art: Path) -> None:
    child = start_build(art, seed=1)
    assert leftovers(art)  # the new artifact's temporary folder, complete
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 143
    assert leftovers(art) == [] and seed_of(art) == 0


def test_sigkill_leftovers_go_with_the_next_build(art: Path) -> None:
    child = start_build(art, seed=1)
    child.kill()
    child.wait(timeout=60)
    assert len(leftovers(art)) == 1 and seed_of(art) == 0  # a dead build's folder
    moespec.build_artifact(SPEC, art, seed=2, force=True)
    assert leftovers(art) == [] and seed_of(art) == 2


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_previous_artifact_stranded_between_renames_goes_back(art: Path) -> None:
    # A build killed between "previous artifact aside" and "new one in place".
    aside = art.parent / f".{art.name}.old-{dead_pid()}-0badcafe"
    aside.mkdir()
    os.replace(art, aside / art.name)
    with pytest.raises(moespec.ArtifactError, match="already exists"):
        moespec.build_artifact(SPEC, art, seed=3)  # recovered first, then not replaced
    assert seed_of(art) == 0 and leftovers(art) == []


def test_a_running_builds_folder_is_left_alone(art: Path) -> None:
    mine = art.parent / f".{art.name}.tmp-{os.getpid()}-00000000"
    mine.mkdir()
    swap.recover(art)
    assert mine.is_dir()
    shutil.rmtree(mine)


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replaces_in_place(art: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:  # the two-rename path of systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    moespec.build_artifact(SPEC, art, seed=4, force=True)
    assert seed_of(art) == 4 and leftovers(art) == []
