"""The training loop behind ``moespec train``: AdamW with linear warmup and a cosine decay,
metrics every ``log_every`` steps, safetensors checkpoints, exact resume.

A run lives in one directory: ``run.json`` (the resolved spec, the overrides and the
training settings), ``metrics.jsonl`` (one JSON object per logged step), ``checkpoints/``,
``loss.png`` and ``expert_load.png``. Training again into the same directory with a larger
``steps`` resumes from its newest checkpoint: the batches are a function of (seed, step), the
checkpoint holds the weights, AdamW's state and the RNG state, and the cosine horizon is
fixed by the first run (``horizon``), so the result equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moespec.errors import BuildError
from moespec.outputs import make_parents, write_text_atomic, writing
from moespec.runtime.layer import MoELayer
from moespec.runtime.network import MoENetwork, build_network
from moespec.spec.load import LoadedSpec, load_spec
from moespec.train import checkpoint, data, plots
from moespec.train.metrics import step_metrics

# (step done, steps in all, latest metrics or None) -> None; the CLI drives its bar with it.
Progress = Callable[[int, int, dict[str, Any] | None], None]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a run (all but ``steps`` and ``device`` must match when resuming)."""

    steps: int
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    horizon: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    device: str | None = None

    def fixed(self) -> dict[str, Any]:
        """What a resumed run must share with the first."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("steps", "device", "horizon")}


def lr_at(step: int, cfg: TrainConfig, horizon: int) -> float:
    """Learning rate of step ``step`` (0-based): linear warmup over ``warmup`` steps, then a
    cosine from ``lr`` to ``lr * min_lr_ratio`` at ``horizon``, flat after it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, horizon - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_record(loaded: LoadedSpec, overrides: list[str], cfg: TrainConfig, horizon: int) -> dict[str, Any]:
    return {
        "spec": loaded.spec.model_dump(mode="json", exclude={"extends"}),
        "overrides": list(overrides),
        "config": cfg.fixed(),
        "horizon": horizon,
    }


def _check_resume(out: Path, record: dict[str, Any], cfg: TrainConfig) -> int:
    """The stored horizon of the run in ``out``; BuildError when it is another run's."""
    old = json.loads((out / "run.json").read_text(encoding="utf-8"))
    for key in ("spec", "config"):
        if old[key] != record[key]:
            diff = sorted(
                k for k in set(old[key]) | set(record[key]) if old[key].get(k) != record[key].get(k)
            )
            raise BuildError(
                f"{out} holds a run with another {key} (differs in {', '.join(diff)}); resume with the same "
                "spec, overrides and settings, or pass another --out"
            )
    if cfg.horizon is not None and cfg.horizon != old["horizon"]:
        raise BuildError(f"{out}: the run's cosine horizon is {old['horizon']}; --horizon cannot change it")
    return int(old["horizon"])


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The logged metrics of the run in ``out`` (empty when none)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_plots(out: Path, rows: list[dict[str, Any]]) -> None:
    """loss.png (the loss over steps) and expert_load.png (each expert's share of the routed
    tokens, one row per (MoE block, expert) with a grey row between blocks, one column per
    logged step)."""
    steps = [r["step"] for r in rows]
    plots.save_png(out / "loss.png", plots.line_plot([(steps, [r["loss"] for r in rows])]))
    shares = [
        [s for i, block in enumerate(r["expert_load"]) for s in ([-1.0] if i else []) + block] for r in rows
    ]
    grid = torch.tensor(shares, dtype=torch.float32).T if shares and shares[0] else torch.zeros(0, 0)
    plots.save_png(out / "expert_load.png", plots.heatmap(grid))


def train(
    spec: str | Path | dict | LoadedSpec,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: str | Path,
    cfg: TrainConfig,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Train the network of ``spec`` (which needs a `model:` section) for ``cfg.steps`` steps
    into the run directory ``out`` (resuming it when it holds this run); returns every
    logged metrics row."""
    loaded = load_spec(spec, list(overrides))
    if loaded.spec.model is None or loaded.spec.model.kind != "decoder_lm":
        raise BuildError(
            f"moespec train trains a decoder LM: {loaded.spec.name} needs `model: {{kind: decoder_lm}}`"
        )
    if cfg.seq_len > loaded.spec.model.max_seq_len:
        raise BuildError(
            f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len {loaded.spec.model.max_seq_len}"
        )
    if loaded.spec.model.vocab_size < data.VOCAB:
        raise BuildError(f"the byte corpus needs model.vocab_size >= {data.VOCAB}")
    out = Path(out)
    horizon = cfg.horizon or cfg.steps
    record = _run_record(loaded, list(overrides), cfg, horizon)
    resuming = (out / "run.json").exists()
    if resuming:
        horizon = _check_resume(out, record, cfg)
        record["horizon"] = horizon
    else:
        make_parents(out / "run.json")
        write_text_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")
    dev = _device(cfg)
    torch.manual_seed(cfg.seed)
    model = build_network(loaded.spec, seed=cfg.seed, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start = 0
    if resuming and (found := checkpoint.latest(out)) is not None:
        start = checkpoint.load(found[1], model, opt)
    rows = [r for r in read_metrics(out) if r["step"] <= start]
    with writing(out / "metrics.jsonl"):
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    corpus = data.corpus()
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, horizon)
        _set_step(model, step)
        ids = data.batch(corpus, step, cfg.batch_size, cfg.seq_len, cfg.seed).to(dev)
        res = model(ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += ids.numel()
        done = step + 1
        row = None
        if done % cfg.log_every == 0 or done == 1 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            row = step_metrics(model, res, done, opt.param_groups[0]["lr"], tokens / max(elapsed, 1e-9))
            rows.append(row)
            with writing(out / "metrics.jsonl"), (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            tokens, t0 = 0, time.perf_counter()
        if done % cfg.save_every == 0 or done == cfg.steps:
            checkpoint.save(out, done, model, opt)
        if progress is not None:
            progress(done, cfg.steps, row)
    write_plots(out, rows)
    return rows


def _set_step(model: MoENetwork, step: int) -> None:
    for m in model.moe_layers:
        if isinstance(m, MoELayer) and m.ir.schedules:
            m.set_step(step)
