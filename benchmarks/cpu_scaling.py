"""Where the fine-grained CPU layer's time goes, per thread count (a diagnostic, not a test).

Run from the repository root::

    .venv/bin/python benchmarks/cpu_scaling.py             # T=2048 d=512 d_ff=128 E=64 k=8
    .venv/bin/python benchmarks/cpu_scaling.py --rounds 20

It prints three things, each measured in this run, contenders interleaved round by round:

1. moespec's fwd+bwd against the dense SwiGLU of equal FLOPs (``bench_cpu.DenseSwiGLU``) with
   1 and with 2 intra-op threads: minimum and median, and their ratio. The gap between the two
   thread counts is parallel efficiency, the gap at 1 thread the extra work of routing.
2. moespec's fwd+bwd split into the expert blocks' parallel phase (``_expert_cpu._run``, the
   workers running gathers, GEMMs and elementwise per expert), the per-token sums
   (``_expert_cpu._token_sum``) and everything else (router, top-k, sort, autograd), by
   timing those two functions in place.
3. How work of each kind scales on the two workers, against one after the other: GEMMs of one
   expert's block shape ([256, 512] x [512, 128]), and the short calls a block makes besides
   (a row gather [256, 512], and silu, mul and silu_backward on [256, 128]); and, for
   comparison, MKL's own two-thread speed-up on the dense layer's GEMM ([2048, 512] x
   [512, 1024]).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cpu as bc

from moespec.ops import _expert_cpu, _parallel

SHAPE = bc.Shape("fine-grained", t=2048, d=512, d_ff=128, e=64, k=8)


def _timed(acc: dict[str, float], key: str, fn: Callable) -> Callable:
    """``fn`` that adds its wall time (s) to ``acc[key]``."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[key] += time.perf_counter() - t0

    return wrapper


def _stats(v: list[float]) -> str:
    return f"min {1e3 * min(v):6.1f}  median {1e3 * statistics.median(v):6.1f} ms"


def layer_vs_dense(rounds: int) -> None:
    """Sections 1 and 2."""
    torch.manual_seed(0)
    ms = bc.build_moespec(SHAPE).train()
    dense = bc.DenseSwiGLU(SHAPE.d, SHAPE.k * SHAPE.d_ff).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, SHAPE.t, SHAPE.d, generator=g)
    gy = torch.randn(1, SHAPE.t, SHAPE.d, generator=g)
    step_ms, step_dense = bc.make_steps(ms, x, gy)[1], bc.make_steps(dense, x[0], gy[0])[1]
    acc = {"parallel": 0.0, "token_sums": 0.0}
    run, token_sum = _expert_cpu._run, _expert_cpu._token_sum
    _expert_cpu._run = _timed(acc, "parallel", run)
    _expert_cpu._token_sum = _timed(acc, "token_sums", token_sum)
    t: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(rounds + 2):  # 2 warm-up rounds
            for threads in (1, 2) if r % 2 else (2, 1):
                torch.set_num_threads(threads)
                for name, step in (("moespec", step_ms), ("dense", step_dense)):
                    acc.update(parallel=0.0, token_sums=0.0)
                    t0 = time.perf_counter()
                    step()
                    total = time.perf_counter() - t0
                    if r < 2:
                        continue
                    t.setdefault((name, threads), []).append(total)
                    if name == "moespec":
                        for part, s in acc.items():
                            t.setdefault((part, threads), []).append(s)
                        t.setdefault(("rest", threads), []).append(total - sum(acc.values()))
    finally:
        _expert_cpu._run, _expert_cpu._token_sum = run, token_sum
    print(f"1. fwd+bwd, moespec vs dense, {rounds} rounds")
    for threads in (1, 2):
        m, d = t[("moespec", threads)], t[("dense", threads)]
        ratio = f"min {min(m) / min(d):.2f}  median {statistics.median(m) / statistics.median(d):.2f}"
        print(f"   {threads} thread(s): moespec {_stats(m)} | dense {_stats(d)} | moespec/dense {ratio}")
    for name in ("moespec", "dense"):
        one, two = t[(name, 1)], t[(name, 2)]
        print(f"   {name} speed-up 1 -> 2 threads: min {min(one) / min(two):.2f}  "
              f"median {statistics.median(one) / statistics.median(two):.2f}")  # fmt: skip
    print("2. moespec fwd+bwd by part (median ms)")
    for threads in (1, 2):
        parts = "  ".join(f"{p} {1e3 * statistics.median(t[(p, threads)]):6.1f}"
                          for p in ("parallel", "token_sums", "rest"))  # fmt: skip
        print(f"   {threads} thread(s): {parts}")
    one, two = t[("parallel", 1)], t[("parallel", 2)]
    print(f"   parallel phase speed-up 1 -> 2 threads: min {min(one) / min(two):.2f}  "
          f"median {statistics.median(one) / statistics.median(two):.2f}")  # fmt: skip


def _two_workers(pieces: list[Callable[[], None]]) -> Callable[[], None]:
    return lambda: _parallel.run(pieces)


def worker_scaling(rounds: int) -> None:
    """Section 3."""
    a = [torch.randn(256, 512) for _ in range(2)]
    b = [torch.randn(512, 128) for _ in range(2)]
    out = [torch.empty(256, 128) for _ in range(2)]
    x_TD, idx_B = torch.randn(2048, 512), torch.randint(0, 2048, (256,))

    def gemms(i: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(512):  # ~ each worker's share of 4 passes of a projection's GEMMs
                torch.mm(a[i], b[i], out=out[i])

        return run

    def short_ops(i: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(256):  # ~ each worker's share of the short calls of 4 passes
                x_TD.index_select(0, idx_B)
                s = torch.nn.functional.silu(out[i])
                s.mul_(out[i])
                torch.ops.aten.silu_backward(s, out[i])

        return run

    xd, wd = torch.randn(2048, 512), torch.randn(512, 1024)
    od = torch.empty(2048, 1024)
    dense = lambda: [torch.mm(xd, wd, out=od) for _ in range(8)]  # noqa: E731
    cases = {
        "expert-shaped GEMMs": (lambda: (gemms(0)(), gemms(1)()), _two_workers([gemms(0), gemms(1)])),
        "gathers and elementwise": (
            lambda: (short_ops(0)(), short_ops(1)()),
            _two_workers([short_ops(0), short_ops(1)]),
        ),
        "dense GEMM, MKL's threads": (dense, dense),
    }
    t: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds + 2):
        for name, fns in cases.items():
            for threads, fn in zip((1, 2), fns, strict=True):
                torch.set_num_threads(threads)
                t0 = time.perf_counter()
                fn()
                if r >= 2:
                    t.setdefault((name, threads), []).append(time.perf_counter() - t0)
    print("3. speed-up from 1 to 2 threads (two workers, or MKL's own threads)")
    for name in cases:
        one, two = t[(name, 1)], t[(name, 2)]
        print(f"   {name:26s} min {min(one) / min(two):.2f}  "
              f"median {statistics.median(one) / statistics.median(two):.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds (default 12)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, fp32, {SHAPE}")
    layer_vs_dense(args.rounds)
    worker_scaling(args.rounds)


if __name__ == "__main__":
    main()
