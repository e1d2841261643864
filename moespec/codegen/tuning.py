"""Block sizes of the Triton expert kernels, per GPU architecture and shape bucket.

Keyed by the architecture (``sm90``, ``sm80``, ``default``; ``interpret`` for Triton's CPU
interpreter, where small blocks keep the tests fast), the dtype class (``16``: bf16/fp16 on
the tensor cores; ``32``: fp32 in exact ``ieee`` dots) and the shape bucket by the rows an
expert averages: ``small`` up to 64 (decode, short prompts), ``mid`` up to 512 (many small
experts: Qwen3-30B-A3B, DeepSeek-V3 at a few thousand tokens), else ``large``.

An entry ``<class>/<bucket>`` holds every kernel's tile; ``<class>/<bucket>/<role>`` overrides
it for one kernel role (``ROLES``), since the kernels differ in what bounds them (the weight
gradient reduces over rows, the activation backward's epilogue holds five tiles). The built-in
entries are starting points; ``moespec tune SPEC`` measures candidates on the GPU at hand,
first for all roles together and then role by role, and writes the best into the user table
(``$MOESPEC_TUNING``, default ``<cache>/tuning.json``), whose entries take precedence.
"""

from __future__ import annotations

import functools
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


# The kernels that read a tile from the table. For ``wgrad`` the tile is the weight's two dims
# (m x n) and k rows per step; a generic entry gives it an n x n tile (its rows block is n).
ROLES = ("up", "rows", "down_bwd", "wgrad")


_TABLES: dict[str, dict[str, Blocks]] = {
    # sm90 role entries: profile_triton.py --sweep on an H200, expert op fwd+bwd at 4096 tokens
    # (Mixtral 21.3 ms with the generic tile; Qwen3-30B-A3B 4.96 ms, where the activation
    # backward's smaller tile alone gave 4.58 ms).
    "sm90": {
        "16/large": Blocks(128, 128, 64, 8, 3),
        "16/large/up": Blocks(128, 128, 64, 8, 4),
        "16/large/down_bwd": Blocks(128, 128, 64, 8, 4),
        "16/mid": Blocks(128, 128, 64, 8, 3),
        "16/mid/down_bwd": Blocks(64, 64, 64, 4, 4),
        "16/small": Blocks(32, 128, 64, 4, 3),
        "32/large": Blocks(64, 64, 32, 4, 3),
        "32/mid": Blocks(64, 64, 32, 4, 3),
        "32/small": Blocks(32, 64, 32, 4, 3),
    },
    "sm80": {
        "16/large": Blocks(128, 128, 32, 4, 4),
        "16/mid": Blocks(128, 128, 32, 4, 4),
        "16/small": Blocks(32, 128, 64, 4, 3),
        "32/large": Blocks(64, 64, 32, 4, 3),
        "32/mid": Blocks(64, 64, 32, 4, 3),
        "32/small": Blocks(32, 64, 32, 4, 3),
    },
    "default": {
        "16/large": Blocks(64, 64, 32, 4, 3),
        "16/mid": Blocks(64, 64, 32, 4, 3),
        "16/small": Blocks(32, 64, 32, 4, 2),
        "32/large": Blocks(32, 64, 32, 4, 2),
        "32/mid": Blocks(32, 64, 32, 4, 2),
        "32/small": Blocks(32, 64, 32, 4, 2),
    },
    "interpret": {
        f"{c}/{b}": Blocks(16, 32, 16, 1, 1) for c in ("16", "32") for b in ("small", "mid", "large")
    },
}

_forced: dict[str, Blocks] = {}
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
    per_expert = n_rows / max(1, n_experts)
    bucket = "small" if per_expert <= 64 else "mid" if per_expert <= 512 else "large"
    return f"{cls}/{bucket}"


def _valid_key(key: str) -> bool:
    parts = key.split("/")
    return len(parts) in (2, 3) and parts[0] in ("16", "32") and (len(parts) == 2 or parts[2] in ROLES)


def user_table_path() -> Path:
    """The user table ``moespec tune`` writes: ``$MOESPEC_TUNING`` or ``<cache>/tuning.json``."""
    return _table_path(os.environ.get("MOESPEC_TUNING"), os.environ.get("MOESPEC_CACHE_DIR"))


@functools.lru_cache(maxsize=8)
def _table_path(explicit: str | None, cache_env: str | None) -> Path:
    # Cached per environment: resolving the home directory costs more than a kernel launch,
    # and the lookup runs for every kernel role of every expert op call.
    return Path(explicit or cache_root() / "tuning.json")


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
                assert isinstance(arch, str) and _valid_key(key), f"bad key {key!r}"
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        raise ValueError(f"{path}: not a moespec tuning table ({e}); delete it or run `moespec tune`") from e
    return data


def blocks(arch: str, dtype_bits: int, n_rows: int, n_experts: int, role: str = "up") -> Blocks:
    """The tile of one kernel role for a call: a forced candidate (``moespec tune``), else the
    user table's entry for the role, its generic entry, the built-in role entry, the built-in
    generic entry, in that order."""
    assert role in ROLES, role
    key = table_key(dtype_bits, n_rows, n_experts)
    used_keys.add((arch, key))
    if role in _forced:
        return _forced[role]
    user = _user_cached().get(arch, {})
    if f"{key}/{role}" in user:
        return Blocks(*user[f"{key}/{role}"]["blocks"])
    if key in user:
        return _generic(Blocks(*user[key]["blocks"]), role)
    table = _TABLES[arch]
    return table.get(f"{key}/{role}") or _generic(table[key], role)


def _generic(b: Blocks, role: str) -> Blocks:
    """A generic entry's tile for ``role``."""
    return Blocks(b.n, b.n, b.k, b.warps, b.stages) if role == "wgrad" else b


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
def forced(b: Blocks | dict[str, Blocks]) -> Iterator[None]:
    """Every kernel call inside uses ``b`` (``moespec tune``'s candidates): one tile for every
    role, or a tile per role named (the others keep their table entries)."""
    global _forced
    new = {r: _generic(b, r) for r in ROLES} if isinstance(b, Blocks) else dict(b)
    assert set(new) <= set(ROLES), new
    old, _forced = _forced, {**_forced, **new}
    try:
        yield
    finally:
        _forced = old


def write_entry(
    arch: str,
    key: str,
    b: Blocks,
    note: dict[str, Any],
    path: Path | None = None,
    drop: list[str] | None = None,
) -> Path:
    """Record ``b`` as the user table's entry for ``arch`` / ``key``, removing the entries
    ``drop`` names (other entries kept; the file replaced atomically)."""
    path = path or user_table_path()
    data = read_user_table(path)
    entries = data.setdefault(arch, {})
    for stale in drop or ():
        entries.pop(stale, None)
    entries[key] = {"blocks": list(astuple(b)), **note}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
