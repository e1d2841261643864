"""Writing output files the same way everywhere: parents created, atomic, errors with a path.

Every file or directory moespec writes for a user (``build -o``, ``schema -o``, ``init``)
goes through here, so they behave alike:

- missing parent directories are created (and removed again if the write fails);
- a file is written to a hidden temporary sibling and renamed into place, so a failure
  (disk full, killed process) never leaves a half-written file at the target;
- an operating-system error (permission denied, not a directory, disk full, ...) becomes an
  :class:`~moespec.errors.OutputError` naming the target path, which the CLI prints as one
  line (``moespec: error: PATH: cannot write: REASON``) with exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from moespec.errors import OutputError


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """Turn any ``OSError`` raised inside the block into an :class:`OutputError` for ``target``."""
    try:
        yield
    except OutputError:
        raise
    except OSError as e:
        raise OutputError.from_os(target, e) from e


def make_parents(target: Path) -> list[Path]:
    """Create the missing parent directories of ``target``; return those created, innermost
    first (for :func:`remove_created`). An existing ancestor that is not a directory is an
    :class:`OutputError` naming it (``mkdir`` would only say "File exists")."""
    with writing(target):
        missing = [p for p in target.parents if not p.exists()]
        nearest = missing[-1].parent if missing else target.parent
        if not nearest.is_dir():
            raise OutputError(target, f"{nearest} is not a directory")
        for p in reversed(missing):
            p.mkdir()
    return missing


def remove_created(dirs: list[Path]) -> None:
    """Remove the directories :func:`make_parents` created, innermost first, if still empty."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()


def temp_sibling(target: Path, tag: str = "tmp") -> Path:
    """A hidden, unique name beside ``target`` (``.NAME.tmp-PID-XXXXXXXX``)."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def write_text_atomic(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` (parents created): all of it or, on any error, nothing."""
    created = make_parents(target)
    tmp = temp_sibling(target)
    try:
        with writing(target):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        remove_created(created)
        raise


def write_bytes_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` (parents created): all of it or, on any error, nothing."""
    created = make_parents(target)
    tmp = temp_sibling(target)
    try:
        with writing(target):
            tmp.write_bytes(data)
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        remove_created(created)
        raise
