"""Block sizes of the Triton expert kernels, per GPU architecture and shape bucket.

Keyed by the architecture (``sm90``, ``sm80``, ``default``; ``interpret`` for Triton's CPU
interpreter, where small blocks keep the tests fast), the dtype class (``16``: bf16/fp16 on
the tensor cores; ``32``: fp32 in exact ``ieee`` dots) and the shape bucket: ``small`` when an
expert averages at most 64 rows (decode, short prompts), else ``large``. The built-in entries
are starting points; ``moespec tune SPEC`` measures candidates on the GPU at hand and writes
the best into the user table (``$MOESPEC_TUNING``, default ``<cache>/tuning.json``), whose
entries take precedence.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from moespec.codegen.load import cache_root


@dataclass(frozen=True)
class Blocks:
    """Tile shape of a GEMM kernel: rows (M), output columns (N), reduction (K), and launch
    parameters."""

    m: int
    n: int
    k: int
    warps: int
    stages: int


_TABLES: dict[str, dict[str, Blocks]] = {
    "sm90": {
        "16/large": Blocks(128, 128, 64, 8, 3),
        "16/small": Blocks(32, 128, 64, 4, 3),
        "32/large": Blocks(64, 64, 32, 4, 3),
        "32/small": Blocks(32, 64, 32, 4, 3),
    },
    "sm80": {
        "16/large": Blocks(128, 128, 32, 4, 4),
        "16/small": Blocks(32, 128, 64, 4, 3),
        "32/large": Blocks(64, 64, 32, 4, 3),
        "32/small": Blocks(32, 64, 32, 4, 3),
    },
    "default": {
        "16/large": Blocks(64, 64, 32, 4, 3),
        "16/small": Blocks(32, 64, 32, 4, 2),
        "32/large": Blocks(32, 64, 32, 4, 2),
        "32/small": Blocks(32, 64, 32, 4, 2),
    },
    "interpret": {f"{c}/{b}": Blocks(16, 32, 16, 1, 1) for c in ("16", "32") for b in ("small", "large")},
}

_forced: Blocks | None = None
# Every (arch, key) looked up since the set was last cleared: `moespec tune` reads which
# entries its runs use.
used_keys: set[tuple[str, str]] = set()


def arch_of(capability: tuple[int, int] | None) -> str:
    """The table of a CUDA compute capability (None: the interpreter)."""
    if capability is None:
        return "interpret"
    major = capability[0]
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "default"


def table_key(dtype_bits: int, n_rows: int, n_experts: int) -> str:
    """``<dtype class>/<bucket>`` of a call: the entry its GEMMs use."""
    cls = "32" if dtype_bits == 32 else "16"
    bucket = "small" if n_rows <= 64 * max(1, n_experts) else "large"
    return f"{cls}/{bucket}"


def user_table_path() -> Path:
    """The user table ``moespec tune`` writes: ``$MOESPEC_TUNING`` or ``<cache>/tuning.json``."""
    return Path(os.environ.get("MOESPEC_TUNING") or cache_root() / "tuning.json")


def read_user_table(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The user table (empty when there is none); a malformed file is an error naming it."""
    path = path or user_table_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        for arch, entries in data.items():
            for key, entry in entries.items():
                Blocks(*entry["blocks"])
                assert isinstance(arch, str) and key.count("/") == 1
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ValueError(f"{path}: not a moespec tuning table ({e}); delete it or run `moespec tune`") from e
    return data


def blocks(arch: str, dtype_bits: int, n_rows: int, n_experts: int) -> Blocks:
    """The GEMM tile for a call: a forced candidate (``moespec tune``), else the user table's
    entry, else the built-in table's."""
    key = table_key(dtype_bits, n_rows, n_experts)
    used_keys.add((arch, key))
    if _forced is not None:
        return _forced
    user = _user_cached().get(arch, {}).get(key)
    return Blocks(*user["blocks"]) if user else _TABLES[arch][key]


_user_cache: tuple[tuple[str, float], dict] | None = None


def _user_cached() -> dict[str, dict[str, Any]]:
    """The user table, re-read when the file changes (a lookup per kernel call stays cheap)."""
    global _user_cache
    path = user_table_path()
    stamp = (str(path), path.stat().st_mtime if path.is_file() else 0.0)
    if _user_cache is None or _user_cache[0] != stamp:
        _user_cache = (stamp, read_user_table(path))
    return _user_cache[1]


@contextmanager
def forced(b: Blocks) -> Iterator[None]:
    """Every kernel call inside uses ``b`` (``moespec tune``'s candidates)."""
    global _forced
    old, _forced = _forced, b
    try:
        yield
    finally:
        _forced = old


def write_entry(arch: str, key: str, b: Blocks, note: dict[str, Any], path: Path | None = None) -> Path:
    """Record ``b`` as the user table's entry for ``arch`` / ``key`` (other entries kept; the
    file replaced atomically)."""
    path = path or user_table_path()
    data = read_user_table(path)
    data.setdefault(arch, {})[key] = {"blocks": list(astuple(b)), **note}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
