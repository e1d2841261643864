"""``moespec tune SPEC``: time candidate block sizes of the Triton expert kernels on this GPU for
a spec's shapes and write the fastest into the user tuning table.

Each candidate runs the layer's forward+backward (the spec's triton layer, ``tokens`` tokens)
``repeat`` times after one untimed run (which compiles it); the median decides. A candidate
that fails to compile or launch (too much shared memory, say) is reported and skipped.
Two passes: every kernel role with the same tile (the generic entry), then role by role with
the others at the generic best or the tile their own pass chose (a role entry is written where
it beats the combination before it by more than ``ROLE_GAIN``); the generic entry replaces the
role entries of earlier runs that this run does not write again. The entries are written for
the table keys the layer's calls use (architecture, dtype class, shape bucket:
``moespec.codegen.tuning``), with the measured times beside them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moespec.codegen import tuning
from moespec.codegen.load import interpreting
from moespec.codegen.tuning import Blocks
from moespec.errors import BuildError, TargetError

CANDIDATES: dict[str, tuple[Blocks, ...]] = {
    "16": (
        Blocks(128, 128, 64, 8, 3),
        Blocks(128, 128, 64, 8, 4),
        Blocks(128, 128, 64, 4, 3),
        Blocks(128, 128, 32, 4, 4),
        Blocks(64, 128, 64, 4, 3),
        Blocks(128, 64, 64, 4, 3),
        Blocks(64, 64, 64, 4, 4),
        Blocks(128, 256, 64, 8, 3),
        Blocks(256, 128, 64, 8, 3),
    ),
    "32": (
        Blocks(64, 64, 32, 4, 3),
        Blocks(32, 64, 32, 4, 2),
        Blocks(64, 128, 32, 4, 3),
        Blocks(128, 64, 32, 8, 3),
    ),
}


# A role's own entry is written only where it beats the generic tile by more than this share
# (smaller differences are within the timing noise of a few repeats).
ROLE_GAIN = 0.02
ALL = "all"  # the pass where every role runs the same tile


@dataclass
class TuneResult:
    """What ``moespec tune`` measured and wrote: times and errors per (role or ``"all"``,
    candidate); ``best`` per role or ``"all"`` (roles only where their entry was written)."""

    spec_name: str
    arch: str
    key: str  # the table keys written, comma-separated
    tokens: int
    times_ms: dict[tuple[str, Blocks], float] = field(default_factory=dict)
    errors: dict[tuple[str, Blocks], str] = field(default_factory=dict)
    best: dict[str, Blocks] = field(default_factory=dict)
    table: Path | None = None


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run


def tune(
    spec: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    tokens: int = 4096,
    repeat: int = 5,
    layer: str | None = None,
    seed: int = 0,
    candidates: tuple[Blocks, ...] | None = None,
    roles: bool = True,
    table: Path | None = None,
) -> TuneResult:
    """Tune the spec's triton layer here (CUDA; the CPU only under TRITON_INTERPRET=1, where
    the times mean nothing) and write the best candidate into ``table`` (the user table when
    None)."""
    from moespec.runtime.build import build_layer
    from moespec.spec.load import load_spec

    loaded = load_spec(spec, overrides)
    if loaded.spec.target.backend != "triton":
        raise BuildError(
            "moespec tune tunes the triton backend's kernels, but the spec has target.backend: "
            f"{loaded.spec.target.backend} (add the override target.backend=triton)"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif interpreting():
        device = torch.device("cpu")
    else:
        raise TargetError("target.backend", "triton, but moespec tune needs a CUDA GPU to time kernels on")
    module = build_layer(loaded.spec, layer=layer, seed=seed, device=device)  # one layer, as bench
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, loaded.spec.d_model, generator=gen, device=device, dtype=module.experts_dtype)
    x.requires_grad_()

    def step() -> None:
        y = module(x)
        (y.float().square().mean() + module.aux_loss).backward()

    tuning.used_keys.clear()
    step()  # compiles the default kernels and tells which table entries the layer uses
    used = sorted(tuning.used_keys)
    assert used, "the triton layer looked up no block sizes"
    arch, keys = used[0][0], [k for _, k in used]
    res = TuneResult(loaded.spec.name, arch, ", ".join(keys), tokens)
    timed = _timer(device)
    cands = candidates or CANDIDATES[keys[0].split("/")[0]]

    def measure(role: str, forced: Blocks | dict[str, Blocks]) -> None:
        cand = forced if isinstance(forced, Blocks) else forced[role]
        try:
            with tuning.forced(forced):
                step()  # compile
                res.times_ms[role, cand] = statistics.median(timed(step) for _ in range(repeat))
        except Exception as e:  # a candidate the GPU cannot run: reported, not fatal
            res.errors[role, cand] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    for cand in cands:
        measure(ALL, cand)
    best_all = _fastest(res, ALL)
    if best_all is None:
        raise BuildError(f"moespec tune: no candidate ran ({res.errors})")
    res.best[ALL] = best_all
    # Role by role (coordinate descent): the other roles hold the generic best or the tile an
    # earlier role pass chose, so the last time measured is that of the combination written.
    current = {r: tuning._generic(best_all, r) for r in tuning.ROLES}
    base = res.times_ms[ALL, best_all]
    role_best: dict[str, Blocks] = {}
    for role in tuning.ROLES if roles else ():
        for cand in cands:
            measure(role, {**current, role: cand})
        best = _fastest(res, role)
        if best is not None and res.times_ms[role, best] < (1 - ROLE_GAIN) * base:
            current[role] = role_best[role] = res.best[role] = best
            base = res.times_ms[role, best]
    note = {
        "tokens": tokens,
        "spec": loaded.spec.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter",
    }
    # One candidate runs every kernel of the layer, so it is the measured best for each entry
    # the layer's calls used (its groups may fall in different shape buckets).
    for key in keys:
        # The generic entry replaces the key's role entries of earlier runs (a role entry
        # would otherwise keep overriding it), except those this run writes again.
        stale = [f"{key}/{r}" for r in tuning.ROLES if r not in role_best]
        ms_all = round(res.times_ms[ALL, best_all], 4)
        res.table = tuning.write_entry(arch, key, best_all, {"ms_fwd_bwd": ms_all, **note}, table, drop=stale)
        for role, b in role_best.items():
            ms = round(res.times_ms[role, b], 4)
            tuning.write_entry(arch, f"{key}/{role}", b, {"ms_fwd_bwd": ms, **note}, table)
    return res


def _fastest(res: TuneResult, role: str) -> Blocks | None:
    times = {b: ms for (r, b), ms in res.times_ms.items() if r == role}
    return min(times, key=times.__getitem__) if times else None


def result_table(res: TuneResult):
    """``(rich Table, footnote)`` for printing a :class:`TuneResult` (fastest first, the chosen
    one starred, failed candidates with their error)."""
    from rich.table import Table

    table = Table(title=f"{res.spec_name}: {res.arch} {res.key}, {res.tokens} tokens, forward+backward")
    for col in ("role", "block m", "n", "k", "warps", "stages", "ms"):
        table.add_column(col, justify="right")
    order = {r: i for i, r in enumerate((ALL, *tuning.ROLES))}
    rows = [
        (role, b, f"{ms:.3f}" + (" *" if res.best.get(role) == b else ""))
        for (role, b), ms in sorted(res.times_ms.items(), key=lambda kv: (order[kv[0][0]], kv[1]))
    ]
    rows += [(role, b, err[:60]) for (role, b), err in res.errors.items()]
    for role, b, cell in rows:
        table.add_row(role, str(b.m), str(b.n), str(b.k), str(b.warps), str(b.stages), cell)
    written = ", ".join(f"{r} = {b}" for r, b in res.best.items())
    return table, f"wrote {res.arch} {res.key}: {written} to {res.table}"
