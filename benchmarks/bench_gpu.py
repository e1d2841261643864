"""GPU benchmark: moespec's MoE layer vs transformers, liger-kernel and a dense GEMM, in bf16.

Run from the repository root (a script, not a pytest test)::

    python3 benchmarks/bench_gpu.py --json out.json         # the H200 run (about 4 minutes)
    .venv/bin/python benchmarks/bench_gpu.py --dry-run      # tiny shapes, fp32, on a CPU
    python3 benchmarks/bench_gpu.py --print-json out.json   # the table of an earlier (even cut) run

Forward (under ``torch.no_grad``) and forward+backward (``y.backward(g)``, grads cleared each
step) of one layer at the expert shapes of Mixtral-8x7B (d 4096, d_ff 14336, E 8, k 2),
Qwen3-30B-A3B (2048, 768, 128, 8) and DeepSeek-V3 (7168, 2048, 256, 8). Every contender has
Mixtral's router (softmax, top-k, renormalised; no aux loss) and SwiGLU experts with the same
weights, drawn on the device from one seed. Backends: moespec-torch and moespec-triton
(``target.backend``); transformers' MixtralSparseMoeBlock with ``experts_implementation``
grouped_mm and eager; liger (that block with liger-kernel's ``LigerFusedMoEFunction``, the op
behind its ``LigerExperts``); dense (up, gate, silu*up, down over T*k rows: the same GEMMs
without routing).

FLOPs count the experts' GEMMs only: forward 2*T*k*d*d_ff*3, forward+backward 3x forward.
A time is the median of N calls (CUDA events) after one or two warm-up calls, N fitting a
per-phase budget; peak memory is ``max_memory_allocated`` over the timed fwd+bwd calls. Before
timing, each backend's output at a few tokens is compared with hf-grouped_mm's experts on the
same routing, from fp32 logits (bf16 logits tie often at E 128/256): relative error, tol 2e-2.
liger-kernel's autotuning (~190 configs a shape) does not fit the window: it runs with its
``LIGER_FUSED_MOE_AUTOTUNE=0`` unless ``--liger-autotune``. A failing case is a table cell
("error: ...", traceback on stderr), a backend this machine lacks is "n/a: ...", and a lost
CUDA context restarts the process on the remaining cases. ``--json`` is rewritten after every
case. Exit status 1 if a case errored or failed its check.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import SPEC, make_steps  # also puts the repository root on sys.path

BACKENDS = ("moespec-torch", "moespec-triton", "hf-grouped_mm", "liger", "dense", "hf-eager")
PEERS = ("hf-grouped_mm", "hf-eager", "liger")
TOL = 2e-2
# The run's start, kept over a restart after a lost CUDA context (the time budget covers both).
T0_WALL = float(os.environ.get("BENCH_GPU_T0", time.time()))
T0 = time.perf_counter() - (time.time() - T0_WALL)


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    d_ff: int
    e: int
    k: int
    tokens: tuple[int, ...]

    def flops_fwd(self, t: int) -> float:
        return 2.0 * t * self.k * self.d * self.d_ff * 3


SHAPES = (
    Shape("mixtral-8x7b", 4096, 14336, 8, 2, (4096, 16384)),
    Shape("qwen3-30b-a3b", 2048, 768, 128, 8, (4096, 16384)),
    Shape("deepseek-v3", 7168, 2048, 256, 8, (4096, 8192)),
)
SHAPE_ORDER = [s.name for s in SHAPES]
HF_CONFIG = dict(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8, vocab_size=32)
HF_CONFIG.update(hidden_act="silu", router_jitter_noise=0.0)
DRY_SHAPES = (
    Shape("mixtral-8x7b", 64, 128, 8, 2, (32, 64)),
    Shape("qwen3-30b-a3b", 64, 32, 16, 8, (32, 64)),
    Shape("deepseek-v3", 96, 32, 32, 8, (32, 64)),
)


def draw_weights(s: Shape, dev: torch.device, dtype: torch.dtype, seed: int = 0):
    """(name, tensor) for router, gate, up, down in that order, drawn on ``dev`` (N(0, 1/fan_in)):
    every backend calls this with the same seed and gets the same weights."""
    g = torch.Generator(device=dev).manual_seed(seed)
    for name, shape, fan_in in (
        ("router", (s.e, s.d), s.d),
        ("gate", (s.e, s.d_ff, s.d), s.d),
        ("up", (s.e, s.d_ff, s.d), s.d),
        ("down", (s.e, s.d, s.d_ff), s.d_ff),
    ):
        yield name, torch.randn(shape, generator=g, device=dev, dtype=dtype).mul_(fan_in**-0.5)


def build_moespec(s: Shape, backend: str, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """The moespec layer, its weights drawn on the device (``moespec.build`` draws them on the CPU
    in fp32, minutes for DeepSeek-V3's 11G parameters): built on ``meta``, then ``to_empty``."""
    from moespec.runtime.build import build_layer
    from moespec.spec.load import load_spec

    overrides = (
        f"d_model={s.d} layer.experts.routed.0.d_ff={s.d_ff} layer.experts.routed.0.count={s.e} "
        f"layer.router.k={s.k} target.dtype={'bf16' if dtype == torch.bfloat16 else 'fp32'} "
        f"target.backend={backend} target.device={dev.type} ~layer.losses"
    )
    spec = load_spec(str(SPEC), overrides.split()).spec
    layer = build_layer(spec, device=dev, meta=True, allow_large=True).to_empty(device=dev)
    params = dict(layer.named_parameters())
    names = {"router": "router.weight", **{n: f"experts.0.w_{n}" for n in ("gate", "up", "down")}}
    if set(params) != set(names.values()) or any(True for _ in layer.buffers()):
        raise RuntimeError(f"unexpected moespec layer state: {sorted(params)}")
    with torch.no_grad():
        for name, w in draw_weights(s, dev, dtype):
            params[names[name]].copy_(w)
    return layer.train()


def build_hf(s: Shape, impl: str, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' MixtralSparseMoeBlock (as in bench_cpu.build_transformers), built on
    ``meta`` and filled on the device; ``impl`` "liger" swaps in liger-kernel's fused experts."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_impl = "grouped_mm" if impl == "liger" else impl
    cfg = MixtralConfig(
        hidden_size=s.d, intermediate_size=s.d_ff, num_local_experts=s.e, num_experts_per_tok=s.k, **HF_CONFIG
    )
    cfg._experts_implementation = hf_impl  # the experts module reads this at every forward
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(cfg)
    block = block.to(dtype).to_empty(device=dev)
    gu = block.experts.gate_up_proj  # [E, 2F, D], gate half first
    dest = {"router": block.gate.weight, "gate": gu[:, : s.d_ff], "up": gu[:, s.d_ff :]}
    dest["down"] = block.experts.down_proj
    with torch.no_grad():
        for name, w in draw_weights(s, dev, dtype):
            dest[name].copy_(w)
    if impl == "liger":
        block.experts = LigerExperts(block.experts)
    return block.train()


class LigerExperts(nn.Module):
    """HF experts' weights through liger-kernel's fused MoE op (what its LigerExperts does)."""

    def __init__(self, hf_experts: nn.Module) -> None:
        super().__init__()
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        self.fn = LigerFusedMoEFunction
        self.gate_up_proj, self.down_proj = hf_experts.gate_up_proj, hf_experts.down_proj

    def forward(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        idx = top_k_index.to(torch.int32)
        return self.fn.apply(x, self.gate_up_proj, self.down_proj, idx, top_k_weights)


class Dense(nn.Module):
    """silu(x W_gate^T) * (x W_up^T) W_down^T over the T*k rows: the experts' GEMM FLOPs, no routing."""

    def __init__(self, s: Shape, dev: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        w = dict(draw_weights(Shape("", s.d, s.d_ff, 1, 1, ()), dev, dtype, seed=3))
        self.w_gate, self.w_up, self.w_down = (nn.Parameter(w[n][0]) for n in ("gate", "up", "down"))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)


def build(backend: str, s: Shape, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    if backend.startswith("moespec-"):
        return build_moespec(s, backend.removeprefix("moespec-"), dev, dtype)
    if backend == "dense":
        return Dense(s, dev, dtype)
    return build_hf(s, backend.removeprefix("hf-"), dev, dtype)


def route(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax, top-k, renormalised (Mixtral's router) from fp32 logits: (indices, weights)."""
    w, idx = logits.float().softmax(-1).topk(k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def reference(s: Shape, dev: torch.device, dtype: torch.dtype, t: int) -> dict:
    """Input, fp32-logit routing and hf-grouped_mm's experts output for the correctness check."""
    g = torch.Generator(device=dev).manual_seed(7)
    x = torch.randn(t, s.d, generator=g, device=dev, dtype=dtype)
    block = build_hf(s, "grouped_mm", dev, dtype)
    with torch.no_grad():
        idx, w = route(F.linear(x.float(), block.gate.weight.float()), s.k)
        y = block.experts(x, idx, w).float()
    return {"x": x, "idx": idx, "w": w, "y": y}


def check(backend: str, mod: nn.Module, s: Shape, ref: dict) -> tuple[float, str]:
    """(relative error vs the reference, note). moespec runs whole (its own fp32 router: the
    note counts tokens routed differently); the HF-layout peers run their experts on ``ref``'s routing."""
    x, note = ref["x"], ""
    with torch.no_grad():
        if backend.startswith("moespec-"):
            y = mod(x[None])[0]
            idx, _ = route(mod.router_logits.reshape(-1, s.e), s.k)
            differ = (idx.sort(-1).values != ref["idx"].sort(-1).values).any(-1).sum().item()
            note = f" ({differ} tokens routed differently)" if differ else ""
        else:
            y = mod.experts(x, ref["idx"], ref["w"])
    err = ((y.float() - ref["y"]).norm() / ref["y"].norm()).item()
    return err, note


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, reps: int) -> list[float]:
    """Milliseconds of ``reps`` calls (CUDA events on the GPU)."""
    if dev.type != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize(dev)
    return [a.elapsed_time(b) for a, b in ev]


def measure(fn, dev: torch.device, budget_s: float, max_reps: int) -> dict:
    """Warm up (compile, autotune, allocator), then the median of as many calls as fit ``budget_s``."""
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first = time.perf_counter() - t0
    est = first if first > 0.5 or max_reps == 1 else timed(fn, dev, 1)[0] / 1e3
    reps = min(max_reps, max(3 if est < 0.5 else 1, int(budget_s / max(est, 1e-5))))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ms = statistics.median(timed(fn, dev, reps))
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"ms": ms, "reps": reps, "first_s": first, "peak_gib": peak}


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        with contextlib.suppress(Exception):  # raises once the context is lost; main restarts then
            torch.cuda.empty_cache()


def run_case(backend: str, s: Shape, t: int, ref: dict | None, dev, dtype, a) -> dict:
    row: dict = {"status": "ok"}
    t0 = time.perf_counter()
    try:
        mod = build(backend, s, dev, dtype)
    except Exception as e:  # a backend this machine or install cannot provide
        if (backend == "moespec-triton" and type(e).__module__ == "moespec.errors") or (
            backend == "liger" and isinstance(e, ImportError)
        ):
            return {"status": "n/a", "message": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
        raise
    row["build_s"] = time.perf_counter() - t0
    if ref is not None and backend != "dense":
        if backend == "hf-grouped_mm":
            row["check"], row["check_note"] = 0.0, " (the reference)"
        else:
            row["check"], row["check_note"] = check(backend, mod, s, ref)
    g = torch.Generator(device=dev).manual_seed(1)
    rows = t * s.k if backend == "dense" else t
    shape = (rows, s.d) if backend == "dense" else (1, t, s.d)
    x = torch.randn(shape, generator=g, device=dev, dtype=dtype)
    gy = torch.randn(shape, generator=g, device=dev, dtype=dtype)
    fwd, fwd_bwd = make_steps(mod, x, gy)
    flops = s.flops_fwd(t)
    for phase, fn, mult, budget in (("fwd", fwd, 1, a.budget_fwd), ("fb", fwd_bwd, 3, 2 * a.budget_fwd)):
        m = measure(fn, dev, budget, a.max_reps)
        row.update({f"{phase}_{k}": v for k, v in m.items()})
        row[f"{phase}_tflops"] = mult * flops / (m["ms"] * 1e-3) / 1e12
    return row


def fmt_row(r: dict) -> str:
    tf = lambda v: f"{v:7.1f}" if v >= 1 else f"{v:7.1e}"  # noqa: E731
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('message', '')}"[:96]
    peak = f"{r['fb_peak_gib']:8.1f}" if r.get("fb_peak_gib") is not None else f"{'-':>8s}"
    chk = "-"
    if "check" in r:
        chk = f"{r['check']:.1e}{' FAIL' if r['check'] > TOL else ''}{r.get('check_note', '')}"
    return (
        f"{r['fwd_ms']:9.2f} {tf(r['fwd_tflops'])} {r['fb_ms']:9.2f} {tf(r['fb_tflops'])} {peak}"
        f" {r['fwd_reps']:>3d}/{r['fb_reps']:<3d} {chk}"
    )


def summarise(results: list[dict]) -> tuple[list[str], list[str]]:
    """Per (shape, T, phase): the best moespec backend vs the best peer and vs dense (throughput
    ratios, > 1: moespec faster), and the targets. A backend that failed its check never counts."""
    bad = {(r["shape"], r["backend"]) for r in results if r.get("check", 0.0) > TOL}
    groups: dict = {}
    for r in sorted(results, key=lambda r: (SHAPE_ORDER.index(r["shape"]), r["tokens"])):
        if r["status"] == "ok" and (r["shape"], r["backend"]) not in bad:
            groups.setdefault((r["shape"], r["tokens"]), {})[r["backend"]] = r
    lines, peer_t, dense_t = [], [], []
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for (shape, t), g in groups.items():
        for phase, name in (("fwd", "fwd"), ("fb", "fwd+bwd")):
            ms = {b: r[f"{phase}_ms"] for b, r in g.items()}
            mine = min((b for b in ms if b.startswith("moespec-")), key=ms.get, default=None)
            peer = min((b for b in ms if b in PEERS), key=ms.get, default=None)
            vs_peer = ms[peer] / ms[mine] if mine and peer else None
            vs_dense = ms["dense"] / ms[mine] if mine and "dense" in ms else None
            lines.append(
                f"{shape:14s} {t:>6d} {name:8s} {mine or '-':15s} {peer or '-':14s} "
                f"{x(vs_peer):>12s} {x(vs_dense):>13s}"
            )
            if phase == "fb":
                ok = "PASS" if vs_peer is not None and vs_peer > 1 else "FAIL"
                ran = ", ".join(b for b in PEERS if b in ms) or "none"
                peer_t.append(f"{ok} fwd+bwd ahead of the best peer, {shape} T={t}: {x(vs_peer)} (of {ran})")
            if shape.startswith("mixtral"):
                ok = "PASS" if vs_dense is not None and vs_dense >= 0.75 else "FAIL"
                dense_t.append(f"{ok} >= 0.75x dense throughput, {shape} T={t} {name}: {x(vs_dense)}")
    return lines, peer_t + dense_t


def render(doc: dict) -> str:
    meta, results = doc["meta"], doc["results"]
    out = [
        f"moespec GPU bench: {meta['dtype']} on {meta['device_name']}; {meta['versions']}"
        + (f"; {meta['elapsed_s']:.0f} s" if "elapsed_s" in meta else ""),
        "FLOPs: expert GEMMs only, fwd = 2*T*k*d*d_ff*3, fwd+bwd = 3x fwd (router, gather/scatter "
        "not counted). ms: median over N timed calls (CUDA events).",
        f"{'shape':14s} {'T':>6s} {'backend':15s} {'fwd ms':>9s} {'TFLOP/s':>7s} {'f+b ms':>9s} "
        f"{'TFLOP/s':>7s} {'peakGiB':>8s} {'N':>7s} check (rel err vs hf-grouped_mm, tol {TOL})",
    ]
    key = lambda r: (SHAPE_ORDER.index(r["shape"]), r["tokens"], BACKENDS.index(r["backend"]))  # noqa: E731
    rows = sorted(results, key=key)
    out += [f"{r['shape']:14s} {r['tokens']:>6d} {r['backend']:15s} {fmt_row(r)}" for r in rows]
    lines, targets = summarise(results)
    out += [
        "",
        "moespec (best backend) vs the best peer (hf-grouped_mm, hf-eager, liger) and vs dense, "
        "throughput ratios (> 1: moespec faster):",
        f"{'shape':14s} {'T':>6s} {'phase':8s} {'best moespec':15s} {'best peer':14s} "
        f"{'moespec/peer':>12s} {'moespec/dense':>13s}",
        *lines,
        "",
        "Targets:",
        *(f"  {t}" for t in targets),
    ]
    if meta.get("notes"):
        out += ["Notes:", *(f"  {n}" for n in meta["notes"])]
    return "\n".join(out)


def write_json(path: str | None, doc: dict) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 timed call (fp32 on a CPU)")
    ap.add_argument("--shapes", help="comma list of " + ", ".join(s.name for s in SHAPES))
    ap.add_argument("--tokens", help="comma list of token counts for every shape (default per shape)")
    ap.add_argument("--backends", help="comma list of " + ", ".join(BACKENDS))
    ap.add_argument("--json", default="/tmp/bench_gpu_last.json", help="every number, after each case")
    ap.add_argument("--print-json", metavar="PATH", help="only print the table of an earlier --json")
    ap.add_argument("--device", help="default: cuda when available, else cpu")
    ap.add_argument("--budget-s", type=float, help="start no case after this (240; dry run: none)")
    ap.add_argument("--budget-fwd", type=float, default=0.15, help="seconds of timed fwd calls (f+b: 2x)")
    ap.add_argument("--max-reps", type=int, default=20)
    ap.add_argument("--check-tokens", type=int, default=512)
    ap.add_argument("--liger-autotune", action="store_true", help="let liger-kernel autotune (slow)")
    ap.add_argument("--resume", action="store_true", help="keep --json's finished cases, run the rest")
    a = ap.parse_args()
    a.shapes = a.shapes.split(",") if a.shapes else [s.name for s in SHAPES]
    a.backends = a.backends.split(",") if a.backends else list(BACKENDS)
    for n, allowed in ((a.shapes, [s.name for s in SHAPES]), (a.backends, BACKENDS)):
        if bad := [x for x in n if x not in allowed]:
            ap.error(f"unknown {bad}; choose from {list(allowed)}")
    if a.dry_run:
        a.max_reps, a.budget_fwd, a.check_tokens = 1, 0.0, 32
    if a.budget_s is None:
        a.budget_s = float("inf") if a.dry_run else 240.0
    return a


def cuda_alive(dev: torch.device) -> bool:
    """False once the CUDA context is lost (illegal address, device assert): every later call fails."""
    try:
        return dev.type != "cuda" or torch.ones(1, device=dev).sum().item() == 1.0
    except Exception:
        return False


def main() -> int:
    a = parse()
    if a.print_json:
        print(render(json.loads(Path(a.print_json).read_text())))
        return 0
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # 22 GB weights come and go
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels (liger, moespec-triton) run interpreted
    if not a.liger_autotune:
        os.environ["LIGER_FUSED_MOE_AUTOTUNE"] = "0"
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [s for s in (DRY_SHAPES if a.dry_run else SHAPES) if s.name in a.shapes]
    if a.tokens:
        shapes = [Shape(s.name, s.d, s.d_ff, s.e, s.k, tuple(map(int, a.tokens.split(",")))) for s in shapes]
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    for dist in ("triton", "liger-kernel"):
        try:
            versions += f", {dist} {version(dist)}"
        except PackageNotFoundError:
            versions += f", no {dist}"
    notes = [f"liger-kernel autotune {'on' if a.liger_autotune else 'off (LIGER_FUSED_MOE_AUTOTUNE=0)'}"]
    if dev.type == "cpu":
        notes.append("CPU dry run: fp32, Triton kernels under TRITON_INTERPRET=1, times meaningless")
    meta = {
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions,
        "flops": "expert GEMMs only: fwd 2*T*k*d*d_ff*3, fwd+bwd 3x fwd",
        "notes": notes,
    }
    doc = {"meta": meta, "results": []}
    if a.resume and Path(a.json).exists():
        doc["results"] = json.loads(Path(a.json).read_text())["results"]
    done = {(r["shape"], r["tokens"], r["backend"]) for r in doc["results"]}
    restarts = int(os.environ.get("BENCH_GPU_RESTARTS", "0"))
    print(f"{meta['device_name']}, {meta['dtype']}, {versions}", flush=True)
    refs: dict = {}
    # Every shape at its first token count, then at its second: a run cut short by the time
    # budget still covers each shape.
    for i in range(max(len(s.tokens) for s in shapes)):
        for s in [s for s in shapes if i < len(s.tokens)]:
            t = s.tokens[i]
            if i == 0 and s.name not in refs:
                try:
                    refs[s.name] = reference(s, dev, dtype, min(a.check_tokens, t))
                except Exception as e:
                    refs[s.name] = None
                    print(f"{s.name}: reference failed: {e!r}", file=sys.stderr)
                free(dev)
            for b in [b for b in a.backends if (s.name, t, b) not in done]:
                row = {"shape": s.name, "d": s.d, "d_ff": s.d_ff, "e": s.e, "k": s.k, "tokens": t}
                row["backend"] = b
                if time.perf_counter() - T0 > a.budget_s:
                    row.update(status="skipped", message=f"time budget ({a.budget_s:.0f} s) spent")
                else:
                    try:
                        row.update(run_case(b, s, t, refs.get(s.name) if i == 0 else None, dev, dtype, a))
                    except Exception as e:
                        row.update(status="error", message=f"{type(e).__name__}: {str(e).strip()[:300]}")
                        print(f"--- {s.name} T={t} {b}:", file=sys.stderr)
                        traceback.print_exc(limit=-4, file=sys.stderr)
                    free(dev)
                doc["results"].append(row)
                write_json(a.json, doc)
                print(f"  {s.name} T={t} {b}: {fmt_row(row)}", flush=True)
                if not cuda_alive(dev) and restarts < 3:  # a fresh process (and context) goes on
                    print(f"CUDA context lost after {b}; restarting the bench", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os.environ.update(BENCH_GPU_RESTARTS=str(restarts + 1), BENCH_GPU_T0=str(T0_WALL))
                    args = [x for x in sys.argv[1:] if x != "--resume"]
                    os.execv(sys.executable, [sys.executable, __file__, *args, "--json", a.json, "--resume"])
            refs[s.name] = None
            free(dev)
    doc["meta"]["elapsed_s"] = time.perf_counter() - T0
    write_json(a.json, doc)
    print("\n" + render(doc))
    bad = [r for r in doc["results"] if r["status"] == "error" or r.get("check", 0.0) > TOL]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
