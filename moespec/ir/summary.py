"""What ``moespec explain`` and the artifact report say about a spec: the resolved spec with
provenance and the derived numbers (torch-free; the CLI formats it)."""

from __future__ import annotations

from typing import Any

from moespec.ir.model_numbers import ModelNumbers, model_numbers
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


def explain_data(
    loaded: LoadedSpec, tokens_per_rank: int = 4096, seq_len: int | None = None
) -> dict[str, Any]:
    """Everything ``explain --json`` prints: resolved spec, provenance, per-layer numbers,
    with a `model:` section the whole network's (``model``, attention FLOPs at ``seq_len``,
    default ``model.max_seq_len``; None without) and, with expert parallelism, each rank's
    share and the all-to-all bytes for ``tokens_per_rank`` tokens (``placement``; empty
    without)."""
    layers = spec_numbers(loaded.spec)
    network = model_numbers(loaded.spec, seq_len) if loaded.spec.model is not None else None
    return {
        "name": loaded.spec.name,
        "description": loaded.spec.description,
        "spec": loaded.spec.model_dump(mode="json", exclude={"extends"}),
        "provenance": {p: o for p, _, o in resolved_leaves(loaded)},
        "layers": [n.to_json() for n in layers],
        "totals": totals(layers),
        "model": network.to_json() if network is not None else None,
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


def model_lines(m: ModelNumbers) -> list[str]:
    """The whole network's numbers as lines of text (explain and the build report)."""
    return [
        f"whole model ({m.kind}, {m.blocks} blocks, {m.moe_blocks} MoE): {m.params_total:,} params "
        f"({human(m.params_total)}), {m.params_active:,} active ({human(m.params_active)})",
        f"  FLOPs/token {human(m.flops_per_token)} at sequence length {m.seq_len:,} (attention scores "
        f"{human(m.flops_attention_scores)}); weights/rank {human(m.weight_bytes_per_rank, 'B')}",
        f"  embedding {human(m.params_embedding)}, head {human(m.params_head)}, attention "
        f"{human(m.params_attention)}, norms {human(m.params_norms)}, dense FFN {human(m.params_dense_ffn)}, "
        f"MoE {human(m.params_moe)} ({human(m.params_moe_active)} active)",
    ]
