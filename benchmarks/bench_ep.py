"""Expert parallelism on the CPU (gloo): tokens/s and the forward's phases at EP 1, 2, 4.

Run from the repository root (a script, not a pytest test)::

    .venv/bin/python benchmarks/bench_ep.py                 # both shapes, EP 1 2 4
    .venv/bin/python benchmarks/bench_ep.py --ep 1 2 --tokens 512

For each shape (a Mixtral-like and a fine-grained layer, fp32, built from
``specs/mixtral-8x7b.yaml`` with overrides) it runs :func:`moespec.bench_ep.bench_expert_parallel`
at each EP degree: EP 1 is the plain layer in one process (the baseline); EP N spawns N gloo
processes, each with ``--tokens`` tokens of its own and ``--threads`` threads (default: the
cores divided by N, at least 1). A step lasts until the slowest rank finishes. The table gives
the median step, tokens/s over all ranks and the ratio to EP 1, and the forward split into
routing (with capacity, losses and statistics), local dispatch/combine work, the all-to-all
(row-count exchange included) and the experts. On one machine the ranks share its cores, so
this measures the cost of the exchange, not a speed-up; with N GPUs and NCCL the same code
path runs over the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moespec.bench_ep import PHASES, bench_expert_parallel  # noqa: E402

SPEC = ROOT / "specs" / "mixtral-8x7b.yaml"
# name -> overrides of the Mixtral spec (fp32, no aux losses beyond the switch loss)
SHAPES = {
    "mixtral-like (d 512, d_ff 1024, E 8, k 2)": [
        "d_model=512",
        "layer.experts.routed.0.d_ff=1024",
        "target.dtype=fp32",
    ],
    "fine-grained (d 512, d_ff 128, E 128, k 8)": [
        "d_model=512",
        "layer.experts.routed.0.d_ff=128",
        "layer.experts.routed.0.count=128",
        "layer.router.k=8",
        "target.dtype=fp32",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="EP degrees (default 1 2 4)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank (default 1024)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads per rank (default cores/N)")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu: gloo; cuda: one GPU per rank, NCCL"
    )
    args = ap.parse_args()
    for shape, overrides in SHAPES.items():
        print(f"\n{shape}, {args.tokens} tokens per rank, median of {args.repeat} steps")
        cols = ("fwd ms", "tok/s", "x EP1", "f+b ms", "tok/s", "x EP1")
        head = f"{'EP':>3} {'thr':>3} " + " ".join(f"{c:>8}" for c in cols)
        print(head + "   forward: routing / dispatch+combine / all-to-all / experts (ms)")
        base = None
        for ep in args.ep:
            r = bench_expert_parallel(
                SPEC,
                overrides,
                nproc=ep,
                tokens=args.tokens,
                repeat=args.repeat,
                threads=args.threads,
                device=args.device,
            )
            base = base or r
            ph = r.forward_phases_s
            split = " / ".join(f"{ph[p] * 1e3:.2f}" for p in PHASES)
            fwd, train = r.tokens_per_s_forward, r.tokens_per_s_forward_backward
            cells = (
                f"{r.forward_s * 1e3:.2f}",
                f"{fwd:.0f}",
                f"{fwd / base.tokens_per_s_forward:.2f}",
                f"{r.forward_backward_s * 1e3:.2f}",
                f"{train:.0f}",
                f"{train / base.tokens_per_s_forward_backward:.2f}",
            )
            print(f"{ep:>3} {r.threads_per_rank:>3} " + " ".join(f"{c:>8}" for c in cells) + f"   {split}")


if __name__ == "__main__":
    main()
