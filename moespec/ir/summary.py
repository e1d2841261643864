"""What ``moespec explain`` and the artifact report say about a spec: the resolved spec with
provenance and the derived numbers (torch-free; the CLI formats it)."""

from __future__ import annotations

from typing import Any

from moespec.ir.numbers import LayerNumbers, spec_numbers
from moespec.ir.placement import placement_numbers
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


def explain_data(loaded: LoadedSpec, tokens_per_rank: int = 4096) -> dict[str, Any]:
    """Everything ``explain --json`` prints: resolved spec, provenance, per-layer numbers and,
    with expert parallelism, each rank's share and the all-to-all bytes for
    ``tokens_per_rank`` tokens (``placement``; empty without)."""
    layers = spec_numbers(loaded.spec)
    return {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "spec": loaded.spec.model_dump(mode="json", exclude={"extends"}),
        "provenance": {p: o for p, _, o in resolved_leaves(loaded)},
        "layers": [n.to_json() for n in layers],
        "totals": totals(layers),
        "placement": [pn.to_json() for pn in placement_numbers(loaded.spec, tokens_per_rank)],
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
