"""Putting a finished artifact in place without ever leaving a half-written or missing one.

- The artifact is written into ``.NAME.tmp-PID-RAND`` beside ``NAME``
  (:func:`moespec.outputs.temp_sibling`).
- It replaces an existing ``NAME`` in one atomic step where the OS allows it: Linux's
  ``renameat2(RENAME_EXCHANGE)`` swaps the two directories, then the old one (now at the
  temporary name) is removed. Elsewhere, ``NAME`` is renamed aside to ``.NAME.old-PID-RAND``
  first, then the new one into place (two renames).
- Recovery rule (:func:`recover`, run before every build into ``NAME``): a ``.NAME.tmp-*`` or
  ``.NAME.old-*`` folder whose PID is no longer running was left by a killed build. A stale
  temporary folder is removed. A stale ``.old`` folder is the previous artifact of a build
  killed between its two renames: it goes back to ``NAME`` when ``NAME`` is missing, and is
  removed otherwise (the new artifact made it into place).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
from pathlib import Path

from moespec.outputs import temp_sibling

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: running
    return True


def recover(out: Path) -> None:
    """Clean up after builds into ``out`` that were killed (see the module docstring)."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue  # not ours to touch, or a build still running (this one included)
        kept = entry / out.name
        if m.group(1) == "old" and kept.is_dir() and not (out.exists() or out.is_symlink()):
            os.replace(kept, out)
            log.warning("%s: restored the previous artifact a killed build had moved aside", out)
        shutil.rmtree(entry, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (flag unknown / fs lacks it), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``, replacing an existing ``out`` (see the module
    docstring); the previous artifact is removed once the new one is in place."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous artifact
        return
    old = temp_sibling(out, "old")
    old.mkdir()
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the previous artifact back
        shutil.rmtree(old, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)
