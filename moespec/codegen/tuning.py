"""Block sizes of the Triton expert kernels, per GPU architecture and shape bucket.

Keyed by the architecture (``sm90``, ``sm80``, ``default``; ``interpret`` for Triton's CPU
interpreter, where small blocks keep the tests fast), the dtype class (``16``: bf16/fp16 on
the tensor cores; ``32``: fp32 in exact ``ieee`` dots) and the shape bucket: ``small`` when an
expert averages at most 64 rows (decode, short prompts), else ``large``. Entries are starting
points, not measurements, until ``moespec tune`` writes measured ones.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocks:
    """Tile shape of a GEMM kernel: rows (M), output columns (N), reduction (K), and launch
    parameters."""

    m: int
    n: int
    k: int
    warps: int
    stages: int


_TABLES: dict[str, dict[tuple[str, str], Blocks]] = {
    "sm90": {
        ("16", "large"): Blocks(128, 128, 64, 8, 3),
        ("16", "small"): Blocks(32, 128, 64, 4, 3),
        ("32", "large"): Blocks(64, 64, 32, 4, 3),
        ("32", "small"): Blocks(32, 64, 32, 4, 3),
    },
    "sm80": {
        ("16", "large"): Blocks(128, 128, 32, 4, 4),
        ("16", "small"): Blocks(32, 128, 64, 4, 3),
        ("32", "large"): Blocks(64, 64, 32, 4, 3),
        ("32", "small"): Blocks(32, 64, 32, 4, 3),
    },
    "default": {
        ("16", "large"): Blocks(64, 64, 32, 4, 3),
        ("16", "small"): Blocks(32, 64, 32, 4, 2),
        ("32", "large"): Blocks(32, 64, 32, 4, 2),
        ("32", "small"): Blocks(32, 64, 32, 4, 2),
    },
    "interpret": {(c, b): Blocks(16, 32, 16, 1, 1) for c in ("16", "32") for b in ("small", "large")},
}


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


def blocks(arch: str, dtype_bits: int, n_rows: int, n_experts: int) -> Blocks:
    """The GEMM tile for ``arch``'s table at a shape (rows routed, experts of the group)."""
    cls = "32" if dtype_bits == 32 else "16"
    bucket = "small" if n_rows <= 64 * max(1, n_experts) else "large"
    return _TABLES[arch][(cls, bucket)]
