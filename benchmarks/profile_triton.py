"""Where the expert ops' time goes on a GPU: a torch.profiler breakdown (GPU time per kernel)
of one forward+backward of the expert op (``expert_ffn_combine``) with each backend's kernels,
at the Mixtral and Qwen3-30B-A3B expert shapes in bf16, on random top-k routing.

    python benchmarks/profile_triton.py [--tokens 4096] [--shapes mixtral,qwen3] [--top 12]

Prints, per shape and backend, the median time of the whole step (CUDA events) and the top
kernels by total GPU time over the profiled steps. GPU only (it exits with a message without
one). Not a timed test: a script for deciding what to optimise next.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import moespec.ops.dispatch  # noqa: F401  (registers sort_by_expert)
from moespec.ops import _expert_grouped, _expert_triton
from moespec.ops._expert_weights import ExpertWeights

SHAPES = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}  # d, d_ff, E, k
KERNELS = {"triton": _expert_triton, "torch": _expert_grouped}


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


def _step(kern, x, tok, offs, w_N, w) -> None:
    y, up, gate = kern.forward(x, tok, offs, 0, w, "silu", w_N)
    kern.backward(torch.ones_like(y), x, tok, offs, 0, w, up, gate, False, "silu", w_N)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--shapes", default="mixtral,qwen3")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_triton.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    for shape in args.shapes.split(","):
        d, f, e, k = SHAPES[shape]
        inputs = _inputs(d, f, e, k, args.tokens)
        flops = 3 * 2 * args.tokens * k * d * f * 3
        for name, kern in KERNELS.items():
            for _ in range(2):
                _step(kern, *inputs)  # compile, warm up
            times = []
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                _step(kern, *inputs)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            ms = statistics.median(times)
            print(f"\n== {shape} T={args.tokens} {name}: fwd+bwd {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    _step(kern, *inputs)
                torch.cuda.synchronize()
            rows = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
            rows.sort(key=lambda ev: ev.device_time_total, reverse=True)
            for ev in rows[: args.top]:
                per = ev.device_time_total / 3 / 1e3
                print(f"  {per:8.3f} ms/step  x{ev.count // 3:<3d} {ev.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
