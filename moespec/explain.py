"""``moespec explain``: the fully resolved spec with provenance, and derived numbers."""

from __future__ import annotations

import json
import os

from moespec.ir.model_numbers import model_numbers
from moespec.ir.numbers import spec_numbers
from moespec.ir.placement import placement_numbers
from moespec.ir.summary import explain_data, human, model_lines, resolved_leaves, totals
from moespec.spec.load import LoadedSpec

__all__ = ["explain_data", "human", "model_lines", "print_explain", "resolved_leaves", "totals"]


def print_explain(loaded: LoadedSpec, tokens_per_rank: int = 4096, seq_len: int | None = None) -> None:
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
    if spec.model is not None:
        for line in model_lines(model_numbers(spec, seq_len)):
            console.print(line, highlight=False)
    _print_placement(console, loaded, tokens_per_rank)


def _print_placement(console, loaded: LoadedSpec, tokens_per_rank: int) -> None:
    """Each rank's experts and weights, the all-to-all bytes, and imbalance warnings."""
    from rich.table import Table

    for pn in placement_numbers(loaded.spec, tokens_per_rank):
        a2a = (
            f"{human(pn.all_to_all_bytes_forward, 'B')} forward, "
            f"{human(pn.all_to_all_bytes_train_step, 'B')} per training step"
        )
        t = Table(
            title=f"expert parallelism of {pn.name!r} over {pn.expert_parallel} ranks; "
            f"all-to-all per rank at {pn.tokens_per_rank:,} tokens/rank: {a2a}"
        )
        for col in ("rank", "routed experts", "routed params", "weights"):
            t.add_column(col, justify="right")
        for r in pn.ranks:
            shown = ", ".join(map(str, r.experts)) if len(r.experts) <= 8 else f"{len(r.experts)} experts"
            t.add_row(str(r.rank), shown, f"{r.routed_params:,}", human(r.weight_bytes, "B"))
        console.print(t)
        if pn.warning:
            console.print(f"[yellow]warning:[/yellow] {pn.warning}", highlight=False)
