"""``moespec explain``: the fully resolved spec with provenance, and derived numbers."""

from __future__ import annotations

import json
import os
from typing import Any

from moespec.ir.numbers import LayerNumbers, spec_numbers
from moespec.spec.load import LoadedSpec


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def resolved_leaves(loaded: LoadedSpec) -> list[tuple[str, Any, str]]:
    """``(path, value, origin)`` for every leaf of the resolved spec; origin ``default`` if unset."""
    prov = {k: str(v) for k, v in loaded.provenance().items()}
    data = loaded.spec.model_dump(mode="json", exclude={"extends"})
    return [(path, value, prov.get(path, "default")) for path, value in _flatten(data).items()]


def totals(layers: list[LayerNumbers]) -> dict[str, int]:
    """Sums over every MoE layer (each group counted ``count`` times)."""
    keys = ("params_total", "params_active", "flops_per_token", "weight_bytes_per_rank")
    return {k: sum(getattr(n, k) * n.count for n in layers) for k in keys} | {
        "moe_layers": sum(n.count for n in layers)
    }


def explain_data(loaded: LoadedSpec) -> dict[str, Any]:
    """Everything ``explain --json`` prints: resolved spec, provenance, per-layer numbers."""
    layers = spec_numbers(loaded.spec)
    return {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "spec": loaded.spec.model_dump(mode="json", exclude={"extends"}),
        "provenance": {p: o for p, _, o in resolved_leaves(loaded)},
        "layers": [n.to_json() for n in layers],
        "totals": totals(layers),
    }


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (binary units for bytes)."""
    base, suffixes = (
        (1024.0, ["", "Ki", "Mi", "Gi", "Ti"]) if unit == "B" else (1000.0, ["", "K", "M", "G", "T"])
    )
    for s in suffixes:
        if abs(n) < base or s == suffixes[-1]:
            return f"{n:.3g}{s}{unit}" if s else f"{n:,.0f}{unit}"
        n /= base
    return str(n)


def print_explain(loaded: LoadedSpec) -> None:
    """Print the resolved spec (with provenance) and the numbers as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if os.isatty(1) else 160)
    spec = loaded.spec
    console.print(f"[bold]{spec.name}[/bold]  {spec.description}", highlight=False)
    leaves = resolved_leaves(loaded)
    width = max(len(f"{p}: {json.dumps(v)}") for p, v, _ in leaves)
    for path, value, origin in leaves:
        # git-blame style: value, then where it was set ("default" = not written anywhere).
        shown = f"{path}: {json.dumps(value)}"
        console.print(
            f"{shown:<{width}}  # {origin}",
            style="dim" if origin == "default" else None,
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    layers = spec_numbers(spec)
    n = Table(title="derived numbers (per MoE layer; FLOPs = forward matmul FLOPs, 2 per MAC)")
    for col in ("group", "layers", "experts", "k", "params", "active params", "FLOPs/token", "weights/rank"):
        n.add_column(col, justify="right")
    for x in layers:
        n.add_row(
            x.name,
            str(x.count),
            str(x.n_experts),
            f"{x.experts_per_token:g}",
            f"{x.params_total:,} ({human(x.params_total)})",
            f"{x.params_active:,} ({human(x.params_active)})",
            human(x.flops_per_token),
            human(x.weight_bytes_per_rank, "B"),
        )
    console.print(n)
    if len(layers) > 1 or layers[0].count > 1:
        tot = totals(layers)
        console.print(
            f"all {tot['moe_layers']} MoE layers: {tot['params_total']:,} params, "
            f"{tot['params_active']:,} active, {human(tot['flops_per_token'])} FLOPs/token, "
            f"{human(tot['weight_bytes_per_rank'], 'B')} weights/rank"
        )
