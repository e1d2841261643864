"""A patched transformers model against the unpatched one: forward+backward time on the CPU.

Run from the repository root (a script, not a pytest test)::

    .venv/bin/python benchmarks/bench_hf_patch.py            # default sizes
    .venv/bin/python benchmarks/bench_hf_patch.py --quick    # fewer repeats

A tiny-but-not-trivial random Mixtral-like model (fp32, nothing downloaded) in three
copies holding the same weights: transformers with ``eager`` experts (the per-expert loop),
transformers with ``grouped_mm`` experts, and the eager copy after ``moespec.hf.patch``. It
asserts the three losses agree, then times loss forward+backward (``--threads`` intra-op
threads), the contenders interleaved round by round so background load hits all alike;
each cell is the median over the rounds and the spread is the interquartile range in percent.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

import moespec.hf


def model_with(impl: str, base: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(base)
    for sub in m.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 rounds")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        hidden_size=a.hidden, intermediate_size=a.ffn, num_local_experts=a.experts, num_experts_per_tok=a.k,
        num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4, vocab_size=1000,
        output_router_logits=True,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    base = transformers.MixtralForCausalLM(cfg).float().train()
    with torch.no_grad():  # unit-scale expert weights, so routing is not degenerate
        for name, prm in base.named_parameters():
            if ".experts." in name or ".gate." in name:
                prm.normal_(0, prm.shape[-1] ** -0.5)
    models = {
        "transformers eager": model_with("eager", base),
        "transformers grouped_mm": model_with("grouped_mm", base),
    }
    patched = model_with("eager", base)
    report = moespec.hf.patch(patched)
    models["moespec.hf.patch"] = patched
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))

    def step(m: torch.nn.Module) -> float:
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return time.perf_counter() - t0

    with torch.no_grad():
        losses = {n: float(m(ids, labels=ids).loss) for n, m in models.items()}
    ref = losses["transformers eager"]
    assert all(abs(v - ref) < 1e-4 * max(1.0, abs(ref)) for v in losses.values()), losses
    for m in models.values():
        step(m)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(3 if a.quick else a.repeat):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(step(models[n]))
    shape = f"D={a.hidden}, F={a.ffn}, E={a.experts}, k={a.k}, tokens={a.batch * a.seq}"
    print(f"{len(report.replaced)} patched MoE layers, {shape}, fp32, {a.threads} threads; loss fwd+bwd")
    base_t = statistics.median(times["transformers eager"])
    print(f"{'model':26s} {'median ms':>10s} {'IQR %':>7s} {'vs eager':>9s}")
    for n, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
        print(f"{n:26s} {med * 1e3:10.1f} {100 * (q[2] - q[0]) / med:7.1f} {base_t / med:8.2f}x")


if __name__ == "__main__":
    main()
