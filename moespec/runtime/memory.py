"""Know the size before allocating: a layer's weight memory from the IR, compared with what
this machine has, refused with the estimate and the ways out when it does not fit.

The estimate is exact for the weights (every tensor of the IR's parameter table in its dtype:
the layer's dtype, fp32 for running controllers, 8 bytes for computed tables) plus the one fp32 tensor
the init draws at a time (:func:`moespec.common.params.init_params`). Available memory is the
kernel's ``MemAvailable``, lowered to the cgroup's limit minus its usage where one is set (a
container's limit is what the OOM killer enforces).
"""

from __future__ import annotations

import math
from pathlib import Path

from moespec.errors import BuildError
from moespec.ir.nodes import MoELayerNode
from moespec.spec.base import BYTES_PER_DTYPE

WRITE_SLICE = 1 << 24  # elements cast and written at a time by a streamed write (`--meta`)

# Refuse above this share of the available memory: the process needs some for itself.
HEADROOM = 0.9


def weight_bytes(ir: MoELayerNode, *, meta: bool = False) -> int:
    """Bytes of the layer's state once built, plus the largest fp32 tensor drawn during init;
    ``meta`` (weights drawn, written and freed one at a time): the largest tensor in fp32 and
    one slice of it being cast and written."""
    item = BYTES_PER_DTYPE[ir.dtype]
    total, largest = 0, 0
    for p in ir.params:
        n = math.prod(p.shape)
        # Computed tensors (hash routing's int64 table) count 8 bytes an element, the most
        # any of them takes; controllers are fp32.
        total += n * (4 if p.controller else 8 if p.value is not None else item)
        largest = max(largest, n)
    return 4 * largest + 8 * WRITE_SLICE if meta else total + 4 * largest


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes() -> int | None:
    """Memory this process can still get, or None where the OS does not say (not Linux)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = min(avail, limit - used) if avail is not None else limit - used
    return avail


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(what: str, need: int, *, allow_large: bool, hint: str) -> None:
    """Raise :class:`BuildError` when ``need`` bytes exceed :data:`HEADROOM` of the available
    memory, unless ``allow_large``; ``hint`` names the ways out."""
    have = available_bytes()
    if allow_large or have is None or need <= HEADROOM * have:
        return
    raise BuildError(
        f"{what} needs about {gib(need)} of memory, but this machine has {gib(have)} available; "
        f"{hint}, or pass allow_large=True (`--allow-large`) to try anyway"
    )


def activation_bytes(ir: MoELayerNode, tokens: int) -> int:
    """A generous estimate of one forward+backward's activations and gradients for ``tokens``
    tokens: per token, 8 rows of width D (input, output, their gradients and temporaries),
    6 of the widest expert width per routed row (up, gate, activation and their gradients)
    and 4 of width E (logits, scores and their gradients), in the layer's dtype."""
    width = max([g.width for g in ir.experts.groups] + [ir.shared.width if ir.shared else 0])
    per_token = 8 * ir.d_model + 6 * ir.dispatch.rows_per_token * width + 4 * ir.experts.n_experts
    return tokens * per_token * BYTES_PER_DTYPE[ir.dtype]


def check_layer_fits(ir: MoELayerNode, *, allow_large: bool, meta: bool = False) -> None:
    """Refuse to build a layer whose weights do not fit in memory (see :func:`check_fits`)."""
    hint = "scale it down with overrides (e.g. d_model=..., layer.experts.routed.0.count=...)"
    if not meta:
        hint += " (`moespec build --meta` writes its artifact without holding the weights)"
    check_fits(
        f"layer {ir.name!r} ({ir.dtype} weights{', written one tensor at a time' if meta else ''})",
        weight_bytes(ir, meta=meta),
        allow_large=allow_large,
        hint=hint,
    )
