"""Operating-system errors while writing are one-line errors naming the path (exit 1), never a
traceback, and leave nothing half-written behind (issue 19, section 4).

The read-only cases need a non-root user (root ignores permissions); each mechanism is also
tested with a parent that is a regular file, which fails for root too, and with a simulated
full disk.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import moespec.export.artifact as artifact
from moespec.cli import main
from moespec.errors import OutputError
from moespec.outputs import write_text_atomic
from moespec.spec.jsonschema import json_schema_text

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "specs" / "debug-tiny.yaml")
needs_non_root = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


def _commands(out: Path) -> dict[str, list[str]]:
    return {
        "build": ["build", TINY, "-o", str(out)],
        "schema": ["schema", "-o", str(out)],
        "init": ["init", str(out)],
    }


COMMANDS = ["build", "schema", "init"]


def _one_line_error(capsys: pytest.CaptureFixture, path: Path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"moespec: error: {path}: cannot write: ")
    assert err.count("\n") == 1, err
    return err


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield d
    d.chmod(stat.S_IRWXU)


@needs_non_root
@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_directory(command: str, read_only: Path, capsys: pytest.CaptureFixture) -> None:
    out = read_only / "out"
    assert main(_commands(out)[command]) == 1
    err = _one_line_error(capsys, out)
    assert "Permission denied" in err
    assert _listing(read_only) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_permission_denied_without_root(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    # The same path as a read-only directory, for CI running as root: the OS refuses the
    # first thing written (a hidden temporary beside the target), with its name as filename.
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir" if command == "build" else "write_text", refuse)
    out = tmp_path / "out"
    assert main(_commands(out)[command]) == 1
    assert _one_line_error(capsys, out).endswith(": cannot write: Permission denied\n")
    assert _listing(tmp_path) == []


@needs_non_root
def test_read_only_missing_parent(read_only: Path, capsys: pytest.CaptureFixture) -> None:
    out = read_only / "a" / "b.yaml"
    assert main(["init", str(out)]) == 1
    assert "Permission denied" in _one_line_error(capsys, out)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("depth", [1, 2])
def test_parent_is_a_file(command: str, depth: int, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A regular file where a directory should be: fails for root too.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker.joinpath(*["sub"] * (depth - 1), "out")
    assert main(_commands(out)[command]) == 1
    err = _one_line_error(capsys, out)
    assert err.endswith(f"{blocker} is not a directory\n")
    assert _listing(tmp_path) == ["file"] and blocker.read_text() == "x"


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_parents_are_created(command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `build` always created its parents; `init` and `schema -o` now do the same.
    out = tmp_path / "a" / "b" / ("out" if command == "build" else "out.yaml")
    assert main(_commands(out)[command]) == 0
    assert out.exists()
    if command == "schema":
        assert out.read_text() == json_schema_text()


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_text

    def half_then_full(self: Path, text: str, *args: object, **kwargs: object) -> int:
        real(self, text[: len(text) // 2], *args, **kwargs)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    out = tmp_path / "new" / "s.json"
    with pytest.raises(OutputError, match=r"s\.json: cannot write: No space left on device$"):
        write_text_atomic(out, json_schema_text())
    assert _listing(tmp_path) == []  # neither the temporary file nor the created parent


def test_disk_full_keeps_the_previous_file(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "moe.yaml"
    out.write_text("previous\n")
    monkeypatch.setattr("moespec.outputs.os.replace", _disk_full)
    assert main(["init", str(out), "--force"]) == 1
    assert "No space left on device" in _one_line_error(capsys, out)
    assert out.read_text() == "previous\n" and _listing(tmp_path) == ["moe.yaml"]


def test_disk_full_during_build(tmp_path: Path, monkeypatch, capsys) -> None:
    def save_file(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(artifact, "save_file", save_file)
    out = tmp_path / "deep" / "art"
    assert main(["build", TINY, "-o", str(out)]) == 1
    err = _one_line_error(capsys, out)
    assert err.endswith("No space left on device\n")  # the hidden temporary name is not shown
    assert _listing(tmp_path) == []


def test_other_os_errors_are_one_line_with_the_path(monkeypatch, capsys) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")

    monkeypatch.setattr("moespec.cli.load_spec", refuse)
    assert main(["explain", TINY]) == 1
    assert capsys.readouterr().err == "moespec: error: /some/file: Permission denied\n"
