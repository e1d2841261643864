"""Host-side cost of one layer step on a GPU: the synchronising calls (torch's sync debug
mode) and a cProfile of the Python side, for the layers ``bench_gpu.py`` times.

    python benchmarks/host_overhead.py [--shape qwen3] [--backend moespec-triton] [--top 30]

A step that waits on the GPU (a ``.item()``, a ``nonzero``, a host copy) or spends
milliseconds in Python shows up here as wall time above the GPU time of
``profile_triton.py --layer``. Prints the wall time of forward (no_grad) and forward+backward
with and without a sync per step, every synchronising call's stack (once each), then the
profile sorted by total time. GPU only. Not a timed test.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
from bench_cpu import make_steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--backend", default="moespec-triton")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("host_overhead.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    s = next(x for x in bench_gpu.SHAPES if x.name.startswith(args.shape[:5]))
    dev, dt = torch.device("cuda"), torch.bfloat16
    mod = bench_gpu.build(args.backend, s, dev, dt)
    x = torch.randn(1, args.tokens, s.d, device=dev, dtype=dt)
    fwd, fwd_bwd = make_steps(mod, x, torch.randn_like(x))
    for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
            torch.cuda.synchronize()
        synced = (time.perf_counter() - t0) / 10 * 1e3
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        host = (time.perf_counter() - t0) / 10 * 1e3  # the host's time when it runs ahead
        torch.cuda.synchronize()
        piped = (time.perf_counter() - t0) / 10 * 1e3
        print(f"{args.backend} {s.name} T={args.tokens} {name}: {synced:.2f} ms synced per step, "
              f"{piped:.2f} ms pipelined, host returns after {host:.2f} ms")  # fmt: skip
    seen: set[str] = set()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd_bwd()
    torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            key = f"{w.filename}:{w.lineno}"
            if key not in seen:
                seen.add(key)
                print(f"SYNC at {key}: {str(w.message)[:120]}")
    print(f"{len(seen)} distinct synchronising call sites" + ("" if seen else " (none)"))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5):
        fwd_bwd()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(args.top)
    st.sort_stats("cumtime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
