"""CPU benchmark: a moespec-built MoE layer vs transformers' Mixtral MoE block vs a dense GEMM.

Run from the repository root (a script, not a pytest test)::

    .venv/bin/python benchmarks/bench_cpu.py            # full shapes
    .venv/bin/python benchmarks/bench_cpu.py --quick    # smaller T, fewer repeats

For each shape it builds the moespec layer from ``specs/mixtral-8x7b.yaml`` (fp32, no aux
losses), a ``MixtralSparseMoeBlock`` from a tiny random ``MixtralConfig`` (nothing is
downloaded) holding the *same* weights, once with ``experts_implementation="eager"`` (the
per-expert loop) and once with ``"grouped_mm"`` (``transformers.integrations.moe``; this
version reads ``config._experts_implementation`` at every experts forward), and a dense
SwiGLU FFN of width k*d_ff over all T tokens (the same expert FLOPs as the MoE layer). It
asserts the moespec and transformers outputs (and input gradients) agree before timing.

Timing: forward (under ``torch.no_grad``) and forward+backward (``y.backward(g)`` with a
fixed upstream gradient, parameter grads cleared each step), with ``torch.set_num_threads``
(2 by default; printed). The contenders are interleaved round by round in rotating order so
background load hits all of them alike. The machine may be shared: each sample records how
much CPU other processes used meanwhile (``/proc/stat`` minus this process), and a cell is
the median over the quiet samples (others below 0.15 cores; every sample with
``--all-samples`` or when fewer than 3 are quiet), printed with the interquartile range in
percent of the median and the quiet count as the noise. The speed of a shared machine drifts
from second to second, so the summary also gives moespec/dense paired by round: the median of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moespec  # noqa: E402

SPEC = ROOT / "specs" / "mixtral-8x7b.yaml"


@dataclass(frozen=True)
class Shape:
    name: str
    t: int
    d: int
    d_ff: int
    e: int
    k: int

    def flops_fwd(self) -> float:
        """Expert GEMM FLOPs of one forward (3 GEMMs over T*K rows); the router is extra."""
        return 3 * 2.0 * self.t * self.k * self.d * self.d_ff


SHAPES = (
    Shape("mixtral-like", t=4096, d=512, d_ff=1024, e=8, k=2),
    Shape("fine-grained", t=2048, d=512, d_ff=128, e=64, k=8),
)


def build_moespec(s: Shape) -> nn.Module:
    overrides = [
        f"d_model={s.d}",
        f"layer.experts.routed.0.d_ff={s.d_ff}",
        f"layer.experts.routed.0.count={s.e}",
        f"layer.router.k={s.k}",
        "target.dtype=fp32",
        "~layer.losses",
    ]
    return moespec.build(str(SPEC), overrides, layer="layer")


def build_transformers(s: Shape, impl: str, src: nn.Module) -> nn.Module:
    """A MixtralSparseMoeBlock with moespec layer ``src``'s weights and experts ``impl``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=s.d,
        intermediate_size=s.d_ff,
        num_local_experts=s.e,
        num_experts_per_tok=s.k,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation=impl,
    )
    cfg._experts_implementation = impl  # the experts module reads this at every forward
    block = MixtralSparseMoeBlock(cfg).to(torch.float32)
    exp = getattr(src.experts, "0")
    with torch.no_grad():
        block.gate.weight.copy_(src.router.weight)
        # gate_up_proj is [E, 2F, D] with the gate half first (chunk(2) -> gate, up).
        block.experts.gate_up_proj.copy_(torch.cat([exp.w_gate, exp.w_up], dim=1))
        block.experts.down_proj.copy_(exp.w_down)
    assert block.experts.config._experts_implementation == impl
    return block


class DenseSwiGLU(nn.Module):
    """Dense FFN of width k*d_ff on every token: the MoE layer's expert FLOPs, one GEMM each."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_up = nn.Parameter(torch.randn(width, d, generator=g) * d**-0.5)
        self.w_gate = nn.Parameter(torch.randn(width, d, generator=g) * d**-0.5)
        self.w_down = nn.Parameter(torch.randn(d, width, generator=g) * width**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


def check_equal(s: Shape, ms: nn.Module, hf: dict[str, nn.Module]) -> None:
    """Same outputs (atol 1e-4) and gradients (x: atol 1e-4; weights: rtol 1e-3) as transformers."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, s.t, s.d, generator=g)
    gy = torch.randn(1, s.t, s.d, generator=g)
    xm = x.clone().requires_grad_(True)
    ms.zero_grad(set_to_none=True)
    ym = ms(xm)
    ym.backward(gy)
    exp = getattr(ms.experts, "0")
    w_ms = {
        "router": ms.router.weight.grad,
        "gate_up": torch.cat([exp.w_gate.grad, exp.w_up.grad], dim=1),
        "down": exp.w_down.grad,
    }
    for name, block in hf.items():
        xh = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        yh = block(xh)
        yh.backward(gy)
        err = (ym - yh).abs().max().item()
        gerr = (xm.grad - xh.grad).abs().max().item()
        assert torch.allclose(ym, yh, atol=1e-4, rtol=0), f"{s.name} {name}: forward max err {err:.3g}"
        assert torch.allclose(xm.grad, xh.grad, atol=1e-4, rtol=0), f"{s.name} {name}: dx err {gerr:.3g}"
        w_hf = {
            "router": block.gate.weight.grad,
            "gate_up": block.experts.gate_up_proj.grad,
            "down": block.experts.down_proj.grad,
        }
        for k, v in w_ms.items():
            assert torch.allclose(v, w_hf[k], rtol=1e-3, atol=1e-4), f"{s.name} {name}: d{k} differs"
        print(f"  check vs transformers[{name}]: max |dy| {err:.2e}, max |dx| {gerr:.2e} (atol 1e-4), dW ok")
    ms.zero_grad(set_to_none=True)


def make_steps(module: nn.Module, x: Tensor, gy: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    params = [p for p in module.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_(True)

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(gy)

    return fwd, fwd_bwd


def _busy_s() -> float:
    """CPU seconds all processes spent busy so far (/proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    ms: float
    foreign: float  # CPU time other processes used during the sample, in cores (0 = quiet)


def bench(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[Sample]]:
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            b0, c0, t0 = _busy_s(), time.process_time(), time.perf_counter()
            fns[n]()
            t1, c1, b1 = time.perf_counter(), time.process_time(), _busy_s()
            foreign = max(0.0, (b1 - b0) - (c1 - c0)) / (t1 - t0)
            times[n].append(Sample((t1 - t0) * 1e3, foreign))
    return times


@dataclass
class Cell:
    med: float
    iqr: float  # interquartile range, % of the median
    lo: float  # minimum
    quiet: int  # samples taken while other processes used < QUIET cores
    n: int


QUIET = 0.15


def summarise(v: list[Sample], quiet_only: bool) -> Cell:
    quiet = [x.ms for x in v if x.foreign < QUIET]
    use = quiet if quiet_only and len(quiet) >= 3 else [x.ms for x in v]
    q = statistics.quantiles(use, n=4) if len(use) >= 4 else [float("nan")] * 3
    m = statistics.median(use)
    return Cell(m, 100.0 * (q[2] - q[0]) / m, min(use), len(quiet), len(v))


def paired_ratio(a: list[Sample], b: list[Sample], quiet_only: bool) -> float:
    """Median over rounds of a's time / b's time in the same round (both quiet when asked and
    at least 3 rounds are): robust to the machine's speed drifting between rounds."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True)]
    quiet = [(x, y) for x, y in pairs if x.foreign < QUIET and y.foreign < QUIET]
    use = quiet if quiet_only and len(quiet) >= 3 else pairs
    return statistics.median(x.ms / y.ms for x, y in use)


INFER_SHAPES = (
    Shape("mixtral-like", t=0, d=512, d_ff=1024, e=8, k=2),
    Shape("fine-grained", t=0, d=512, d_ff=128, e=128, k=8),
)
INFER_TOKENS = (1, 8, 64, 256, 2048)


def main_infer(args: argparse.Namespace) -> None:
    """``--infer``: eval forward (no_grad) at each token count, moespec vs transformers' eager
    and grouped_mm experts (same weights), medians and the paired ratio to the best of them."""
    names = ["moespec", "hf-eager", "hf-grouped_mm"]
    rows = []
    for base in INFER_SHAPES:
        if args.shape and base.name not in args.shape:
            continue
        torch.manual_seed(0)
        ms = build_moespec(Shape(base.name, 64, base.d, base.d_ff, base.e, base.k)).eval()
        hf = {f"hf-{i}": build_transformers(base, i, ms).eval() for i in ("eager", "grouped_mm")}
        for t in INFER_TOKENS:
            x = torch.randn(1, t, base.d, generator=torch.Generator().manual_seed(t))
            mods = {"moespec": ms, **hf}

            def call(m: nn.Module, x: Tensor = x) -> Callable[[], None]:
                def run() -> None:
                    with torch.no_grad():
                        m(x)

                return run

            rounds = args.rounds or (30 if t <= 64 else 10)
            res = bench({n: call(m) for n, m in mods.items()}, rounds, args.warmup)
            cells = {n: summarise(v, not args.all_samples) for n, v in res.items()}
            best = min(("hf-eager", "hf-grouped_mm"), key=lambda n: cells[n].med)
            paired = paired_ratio(res["moespec"], res[best], not args.all_samples)
            rows.append((base.name, t, cells, best, paired))
            print(f"  {base.name} T={t}: " + "  ".join(f"{n} {c.med:.2f} ms" for n, c in cells.items()))
    print(f"\nEval forward (no_grad), median ms; threads={torch.get_num_threads()}, fp32")
    print(
        f"{'shape':13s} {'T':>5s}"
        + "".join(f"{n:>15s}" for n in names)
        + f"{'ms/best-hf':>11s}{'(paired)':>9s}"
    )
    for name, t, cells, best, paired in rows:
        line = f"{name:13s} {t:5d}" + "".join(f"{cells[n].med:15.3f}" for n in names)
        print(line + f"{cells['moespec'].med / cells[best].med:11.2f}{paired:9.2f}")
    print("Target: ms/best-hf <= 1.00 at every T and shape.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T/4 and fewer rounds")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per cell (default 15, quick 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--shape", choices=[s.name for s in SHAPES], action="append", help="limit to these shapes"
    )
    ap.add_argument("--no-eager", action="store_true", help="skip the (slow) transformers eager loop")
    ap.add_argument(
        "--all-samples", action="store_true", help="medians over every sample, not only the quiet ones"
    )
    ap.add_argument("--infer", action="store_true", help="eval forward at T in 1..2048 (inference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.infer:
        main_infer(args)
        return
    rounds = args.rounds or (5 if args.quick else 15)
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, os.cpu_count() = {os.cpu_count()}, fp32, "
        f"rounds {rounds}, warmup {args.warmup}"
    )
    rows = []
    for s in SHAPES:
        if args.shape and s.name not in args.shape:
            continue
        if args.quick:
            s = Shape(s.name, s.t // 4, s.d, s.d_ff, s.e, s.k)
        print(f"\n== {s.name}: T={s.t} d={s.d} d_ff={s.d_ff} E={s.e} k={s.k} ==")
        torch.manual_seed(0)
        ms = build_moespec(s).train()
        impls = ["grouped_mm"] if args.no_eager else ["eager", "grouped_mm"]
        hf = {impl: build_transformers(s, impl, ms).train() for impl in impls}
        check_equal(s, ms, hf)
        dense = DenseSwiGLU(s.d, s.k * s.d_ff).train()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(1, s.t, s.d, generator=g)
        gy = torch.randn(1, s.t, s.d, generator=g)
        mods = {"moespec": ms, **{f"hf-{i}": m for i, m in hf.items()}, "dense": dense}
        steps = {n: make_steps(m, x, gy) for n, m in mods.items()}
        for phase, i in (("fwd", 0), ("fwd+bwd", 1)):
            t = bench({n: st[i] for n, st in steps.items()}, rounds, args.warmup)
            cells = {n: summarise(v, not args.all_samples) for n, v in t.items()}
            rows.append((s, phase, cells, paired_ratio(t["moespec"], t["dense"], not args.all_samples)))
            print(f"  {phase}: " + "  ".join(f"{n} {c.med:.1f} ms (IQR {c.iqr:.0f}%, quiet {c.quiet}/{c.n})"
                                            for n, c in cells.items()))  # fmt: skip

    names = ["moespec", "hf-eager", "hf-grouped_mm", "dense"]
    basis = "every sample" if args.all_samples else f"quiet samples (other processes < {QUIET} cores busy)"
    print(f"\nSummary: median ms over {basis} [IQR % of median]; threads={torch.get_num_threads()}, fp32")
    hdr = f"{'shape':13s} {'phase':8s}" + "".join(f"{n:>19s}" for n in names)
    print(hdr + f"{'ms/best-hf':>11s}{'ms/dense':>9s}{'(min)':>7s}{'(paired)':>9s}{'GFLOP/s':>8s}")
    for s, phase, res, paired in rows:
        line = f"{s.name:13s} {phase:8s}"
        for n in names:
            line += f"{res[n].med:11.1f} [{res[n].iqr:3.0f}%]" if n in res else f"{'-':>19s}"
        best_hf = min(res[n].med for n in res if n.startswith("hf-"))
        flops = s.flops_fwd() * (3 if phase == "fwd+bwd" else 1)
        ms, dn = res["moespec"], res["dense"]
        line += (
            f"{ms.med / best_hf:11.2f}{ms.med / dn.med:9.2f}{ms.lo / dn.lo:7.2f}{paired:9.2f}"
            f"{flops / ms.med / 1e6:8.1f}"
        )
        print(line)
    print(
        "Columns: ms/best-hf = moespec / fastest transformers path; ms/dense = moespec / dense SwiGLU "
        "of width k*d_ff (medians; (min) = ratio of the minima; (paired) = median over rounds of the ratio "
        "within a round); GFLOP/s = moespec expert GEMM FLOPs / time."
    )
    print("Targets: ms/best-hf <= 1.00 in every cell; fwd+bwd ms/dense <= 1.30.")


if __name__ == "__main__":
    main()
