"""``moespec bench``: time a built layer's forward and forward+backward on this machine.

Forward runs in eval mode under ``torch.no_grad`` (inference); forward+backward runs in
training mode and back-propagates ``y.sum() + aux_loss`` into every parameter. Each pass is
warmed up, then timed ``repeat`` times; the median is reported. Achieved FLOP/s use the
IR's ``flops_per_token`` (forward matmul FLOPs, 2 per MAC), counting forward+backward as
3x forward, so they compare to the machine's matmul peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moespec.api import BuildError
from moespec.explain import human
from moespec.runtime.build import build_layer
from moespec.runtime.layer import MoELayer
from moespec.runtime.memory import activation_bytes, check_fits

# (pass name, step index, steps in the pass) -> None; the CLI drives a progress bar with it.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PassTiming:
    """Timings of one pass (``forward`` or ``forward+backward``)."""

    name: str
    median_s: float
    min_s: float
    tokens_per_s: float
    flop_per_s: float
    times_s: list[float]


@dataclass(frozen=True)
class BenchResult:
    """What ``moespec bench`` prints (``--json`` is ``asdict`` of this)."""

    spec_name: str
    layer: str
    device: str
    dtype: str
    threads: int
    tokens: int
    d_model: int
    n_experts: int
    experts_per_token: float
    params_total: int
    flops_per_token: int
    warmup: int
    repeat: int
    passes: list[PassTiming]

    def to_json(self) -> dict[str, object]:
        """Plain dict for ``--json`` output."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], name: str, warmup: int, repeat: int, device: torch.device,
          progress: Progress | None) -> list[float]:  # fmt: skip
    total, times = warmup + repeat, []
    for i in range(total):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(name, i + 1, total)
    return times


def bench_layer(
    module: MoELayer,
    *,
    spec_name: str,
    tokens: int = 256,
    repeat: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    allow_large: bool = False,
) -> BenchResult:
    """Time ``module`` on ``tokens`` random tokens; see the module docstring for what is timed.
    Refused before allocating when the activations may not fit in memory, unless
    ``allow_large``."""
    if tokens < 1 or repeat < 1 or warmup < 0:
        raise ValueError("bench needs tokens >= 1, repeat >= 1 and warmup >= 0")
    check_fits(
        f"benchmarking {tokens} tokens",
        activation_bytes(module.ir, tokens),
        allow_large=allow_large,
        hint="use fewer --tokens",
    )
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BuildError(f"unknown device {device!r} (expected e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"cannot bench on {dev}: CUDA is not available here (pass --device cpu)")
    module = module.to(dev)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, module.d_model, generator=gen).to(dev, module.dtype)
    flops = module.ir.numbers.flops_per_token

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        y = module(x)
        loss = y.float().sum() + module.aux_loss
        loss.backward()

    passes = []
    was_training = module.training
    try:
        for name, step, train, mult in (
            ("forward", forward, False, 1),
            ("forward+backward", forward_backward, True, 3),
        ):
            module.train(train)
            times = _time(step, name, warmup, repeat, dev, progress)
            med = statistics.median(times)
            passes.append(PassTiming(name, med, min(times), tokens / med, mult * flops * tokens / med, times))
    finally:
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return _result(module, spec_name, dev, tokens, warmup, repeat, passes)


def layer_for_bench(
    target: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    layer: str | None,
    seed: int,
    device: str | None = None,
    allow_large: bool = False,
) -> tuple[MoELayer, str, str]:
    """``(module, spec name, device)`` for a spec file or an artifact directory; the module is
    built on ``device`` (``target.device`` if None, checked against this machine)."""
    from moespec.runtime.layout import MANIFEST
    from moespec.runtime.load import load
    from moespec.runtime.manifest import read_manifest
    from moespec.spec.load import load_spec

    path = Path(target)
    if path.is_dir() and (path / MANIFEST).is_file():
        if overrides or layer:
            raise BuildError(f"{path}: an artifact directory takes no overrides or --layer")
        manifest = read_manifest(path)
        module = load(path, device=device, allow_large=allow_large)
        if not isinstance(module, MoELayer):
            raise BuildError(
                f"{path}: holds a network; moespec bench times one MoE layer (build it with --layer)"
            )
        return module, manifest.spec_name, device or manifest.target.get("device", "cpu")
    loaded = load_spec(path, overrides)
    # A layer, even of a spec with a `model:` section: bench times one MoE layer.
    module = build_layer(loaded.spec, layer=layer, seed=seed, device=device, allow_large=allow_large)
    return module, loaded.spec.name, device or loaded.spec.target.device


def _result(module: MoELayer, spec_name: str, dev: torch.device, tokens: int, warmup: int, repeat: int,
            passes: list[PassTiming]) -> BenchResult:  # fmt: skip
    n = module.ir.numbers
    return BenchResult(
        spec_name=spec_name,
        layer=module.ir.name,
        device=str(dev),
        dtype=str(module.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        tokens=tokens,
        d_model=module.d_model,
        n_experts=n.n_experts,
        experts_per_token=n.experts_per_token,
        params_total=n.params_total,
        flops_per_token=n.flops_per_token,
        warmup=warmup,
        repeat=repeat,
        passes=passes,
    )


INFER_TOKENS = (1, 8, 64, 256, 2048)


def bench_infer(
    module: MoELayer,
    *,
    spec_name: str,
    tokens: tuple[int, ...] = INFER_TOKENS,
    repeat: int = 20,
    warmup: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    allow_large: bool = False,
) -> BenchResult:
    """Inference: eval forward under ``torch.no_grad`` at each token count of ``tokens``, from
    decode (one token) to prefill; one pass per count, medians of ``repeat`` runs."""
    if not tokens or min(tokens) < 1 or repeat < 1 or warmup < 0:
        raise ValueError("bench --infer needs token counts >= 1, repeat >= 1 and warmup >= 0")
    check_fits(
        f"benchmarking {max(tokens)} tokens",
        activation_bytes(module.ir, max(tokens)),
        allow_large=allow_large,
        hint="use fewer tokens",
    )
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"cannot bench on {dev}: CUDA is not available here (pass --device cpu)")
    module = module.to(dev)
    gen = torch.Generator().manual_seed(seed)
    flops = module.ir.numbers.flops_per_token
    passes, was_training = [], module.training
    module.eval()
    try:
        for t in tokens:
            x = torch.randn(t, module.d_model, generator=gen).to(dev, module.dtype)

            def forward(x: torch.Tensor = x) -> None:
                with torch.no_grad():
                    module(x)

            name = f"forward, {t} token{'s' if t != 1 else ''}"
            times = _time(forward, name, warmup, repeat, dev, progress)
            med = statistics.median(times)
            passes.append(PassTiming(name, med, min(times), t / med, flops * t / med, times))
    finally:
        module.train(was_training)
    return _result(module, spec_name, dev, max(tokens), warmup, repeat, passes)


def result_table(res: BenchResult):
    """``(heading, rich Table, footnote)`` for printing a :class:`BenchResult`."""
    from rich.table import Table

    runs = f"{res.repeat} run{'s' if res.repeat != 1 else ''}"
    infer = res.passes and res.passes[0].name.startswith("forward, ")
    size = "eval forward (inference), no_grad," if infer else f"{res.tokens} tokens x"
    head = (
        f"{res.spec_name}/{res.layer} on {res.device} ({res.threads} threads), {res.dtype}: "
        f"{size} d_model {res.d_model}, {res.n_experts} experts "
        f"(k={res.experts_per_token:g}); median of {runs} after {res.warmup} warmup"
    )
    table = Table()
    for col in ("pass", "median", "min", "tokens/s", "achieved FLOP/s"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for p in res.passes:
        table.add_row(
            p.name,
            f"{p.median_s * 1e3:.3f} ms",
            f"{p.min_s * 1e3:.3f} ms",
            human(p.tokens_per_s),
            human(p.flop_per_s) + "FLOP/s",
        )
    foot = (
        f"FLOPs/token {human(res.flops_per_token)} (forward matmuls, 2 per MAC; forward+backward "
        f"counted as 3x), {human(res.params_total)} params"
    )
    return head, table, foot
