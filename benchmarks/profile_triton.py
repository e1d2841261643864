"""Where the expert ops' time goes on a GPU, and which tile each Triton kernel wants.

    python benchmarks/profile_triton.py [--tokens 4096] [--shapes mixtral,qwen3] [--top 12]
    python benchmarks/profile_triton.py --layer      # whole layers: router, sort, aux loss too
    python benchmarks/profile_triton.py --sweep      # per kernel role: time every tile candidate

Default: a torch.profiler breakdown (GPU time per kernel) of one forward+backward of the expert
op (``expert_ffn_combine``) with each backend's kernels, at the Mixtral, Qwen3-30B-A3B and
DeepSeek-V3 expert shapes in bf16, on random top-k routing. ``--layer``: the same for the
layers ``bench_gpu.py`` times (moespec both backends, transformers' grouped_mm block), forward
under no_grad and forward+backward. ``--sweep``: for each kernel role of the Triton op
(``moespec.codegen.tuning.ROLES``), the op's forward+backward with each of ``moespec tune``'s
candidates forced on that role alone (the others at the table's tile), fastest first.
Prints medians of CUDA-event times. GPU only (it exits with a message without one). Not a
timed test: a script for deciding what to optimise next.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

import moespec.ops.dispatch  # noqa: F401  (registers sort_by_expert)
from moespec.codegen import tuning
from moespec.ops import _expert_grouped, _expert_triton
from moespec.ops._expert_weights import ExpertWeights

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8), "deepseek": (7168, 2048, 256, 8)}
KERNELS = {"triton": _expert_triton, "torch": _expert_grouped}
LAYER_BACKENDS = ("moespec-triton", "moespec-torch", "hf-grouped_mm")


def _inputs(d: int, f: int, e: int, k: int, t: int):
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(t, e, device=dev, generator=g)
    w_TK, idx_TK = logits.softmax(-1).topk(k, dim=-1)
    tok, slot, offs = torch.ops.moespec.sort_by_expert(idx_TK, torch.ones_like(idx_TK, dtype=torch.bool), e)
    w_N = (w_TK / w_TK.sum(-1, keepdim=True)).reshape(-1)[slot]
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g) * 0.02  # noqa: E731
    none = torch.empty(0, device=dev, dtype=dt)
    w = ExpertWeights(mk(e, f, d), mk(e, f, d), mk(e, d, f), none, none, none)
    return torch.randn(t, d, device=dev, dtype=dt, generator=g), tok, offs, w_N, w


def _op_step(kern, x, tok, offs, w_N, w) -> None:
    y, up, gate = kern.forward(x, tok, offs, 0, w, "silu", w_N)
    kern.backward(torch.ones_like(y), x, tok, offs, 0, w, up, gate, False, "silu", w_N)


def _median_ms(fn: Callable[[], None], reps: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _profile(fn: Callable[[], None], top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    rows = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
    rows.sort(key=lambda ev: ev.device_time_total, reverse=True)
    total = sum(ev.device_time_total for ev in rows) / 3 / 1e3
    print(f"  {total:8.3f} ms/step of GPU time in {len(rows)} kernels; top:")
    for ev in rows[:top]:
        print(f"  {ev.device_time_total / 3 / 1e3:8.3f} ms/step  x{ev.count // 3:<3d} {ev.key[:90]}")


def _ops(shape: str, t: int, top: int) -> None:
    d, f, e, k = SHAPES[shape]
    inputs = _inputs(d, f, e, k, t)
    flops = 3 * 2 * t * k * d * f * 3
    for name, kern in KERNELS.items():
        ms = _median_ms(lambda kern=kern: _op_step(kern, *inputs))
        print(f"\n== op {shape} T={t} {name}: fwd+bwd {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
        _profile(lambda kern=kern: _op_step(kern, *inputs), top)


def _layers(shape: str, t: int, top: int) -> None:
    import bench_gpu
    from bench_cpu import make_steps

    s = next(x for x in bench_gpu.SHAPES if x.name.startswith(shape[:5]))
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, t, s.d, generator=g, device=dev, dtype=dt)
    gy = torch.randn(1, t, s.d, generator=g, device=dev, dtype=dt)
    for backend in LAYER_BACKENDS:
        mod = bench_gpu.build(backend, s, dev, dt)
        fwd, fwd_bwd = make_steps(mod, x, gy)
        for phase, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
            ms = _median_ms(fn)
            tf = mult * s.flops_fwd(t) / ms / 1e9
            print(f"\n== layer {shape} T={t} {backend} {phase}: {ms:.2f} ms, {tf:.0f} TFLOP/s")
            _profile(fn, top)
        del mod, fwd, fwd_bwd
        torch.cuda.empty_cache()


def _sweep(shape: str, t: int) -> None:
    from moespec.tune import CANDIDATES

    d, f, e, k = SHAPES[shape]
    inputs = _inputs(d, f, e, k, t)
    flops = 3 * 2 * t * k * d * f * 3
    base = _median_ms(lambda: _op_step(_expert_triton, *inputs))
    print(f"\n== sweep {shape} T={t}: table tiles {base:.2f} ms ({flops / base / 1e9:.0f} TFLOP/s)")
    for role in tuning.ROLES:
        res: dict[tuning.Blocks, float | str] = {}
        for cand in CANDIDATES["16"]:
            try:
                with tuning.forced({role: cand}):
                    res[cand] = _median_ms(lambda: _op_step(_expert_triton, *inputs), reps=3, warm=1)
            except Exception as err:  # out of shared memory and the like: reported
                res[cand] = f"{type(err).__name__}: {str(err).splitlines()[0][:50] if str(err) else ''}"
        name = lambda c: f"{c.m}x{c.n}x{c.k}/{c.warps}w/{c.stages}s"  # noqa: E731
        ok = sorted(((c, v) for c, v in res.items() if isinstance(v, float)), key=lambda cv: cv[1])
        cells = [f"{name(c)} {v:.2f}" for c, v in ok]
        cells += [f"{name(c)} {v}" for c, v in res.items() if isinstance(v, str)]
        print(f"  {role:9s} " + " | ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--top", type=int, default=12)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--layer", action="store_true", help="whole layers (router and bookkeeping included)")
    mode.add_argument("--sweep", action="store_true", help="per kernel role, every tile candidate")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_triton.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    for shape in args.shapes.split(","):
        if args.sweep:
            _sweep(shape, args.tokens)
        elif args.layer:
            _layers(shape, args.tokens, args.top)
        else:
            _ops(shape, args.tokens, args.top)
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    sys.exit(main())
