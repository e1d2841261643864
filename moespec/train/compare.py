"""``moespec train --compare``: several specs trained on the same data with the same seed and
settings, their loss curves on one plot and a table of what a researcher weighs when
choosing between them (active parameters, throughput, final loss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moespec.ir.model_numbers import model_numbers
from moespec.outputs import write_text_atomic
from moespec.spec.load import load_spec
from moespec.train import plots
from moespec.train.loop import Progress, TrainConfig, train


def compare(
    specs: list[str | Path],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: str | Path,
    cfg: TrainConfig,
    progress: Progress | None = None,
    on_start: Any = None,
) -> list[dict[str, Any]]:
    """Train each spec into ``out/<i>-<name>`` (each resumable as a run of its own), then
    write ``out/compare.png`` (the loss curves, in the order of ``specs``) and
    ``out/compare.json``; returns the table's rows. ``on_start(i, name)`` is called before
    each run (the CLI names the run on its progress bar)."""
    out = Path(out)
    rows, curves = [], []
    for i, spec in enumerate(specs):
        loaded = load_spec(spec, list(overrides))
        name = loaded.spec.name
        if on_start is not None:
            on_start(i, name)
        metrics = train(loaded, (), out=out / f"{i}-{name}", cfg=cfg, progress=progress)
        numbers = model_numbers(loaded.spec, cfg.seq_len)
        rates = [r["tokens_per_s"] for r in metrics[1:]] or [r["tokens_per_s"] for r in metrics]
        rows.append(
            {
                "spec": str(spec),
                "name": name,
                "params_total": numbers.params_total,
                "params_active": numbers.params_active,
                "flops_per_token": numbers.flops_per_token,
                "tokens_per_s": round(sum(rates) / len(rates), 1),
                "final_loss": metrics[-1]["loss"],
                "colour": "#{:02x}{:02x}{:02x}".format(*plots.COLOURS[i % len(plots.COLOURS)]),
            }
        )
        curves.append(([r["step"] for r in metrics], [r["loss"] for r in metrics]))
    plots.save_png(out / "compare.png", plots.line_plot(curves))
    write_text_atomic(out / "compare.json", json.dumps(rows, indent=2) + "\n")
    return rows
