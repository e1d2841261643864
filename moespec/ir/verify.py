"""IR invariants, checked once the IR is built (``build_program``). A failure here is a compiler
bug, not user error."""

from __future__ import annotations

from moespec.errors import IRError
from moespec.ir.nodes import MoELayerNode, Program

__all__ = ["IRError", "verify", "verify_layer"]


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise IRError(f"IR invariant violated at {where}: {msg}")


def verify_layer(layer: MoELayerNode) -> None:
    """Check one layer's invariants."""
    ex, at = layer.experts, layer.experts.origin
    nxt = 0
    for g in ex.groups:
        _check(g.first == nxt and g.count > 0 and g.width > 0, at, "FFN expert indices must be contiguous")
        nxt += g.count
    for z in ex.zero_compute:
        _check(z.first == nxt and z.count > 0, at, "zero-compute experts must follow the FFN experts")
        nxt += z.count
    _check(nxt == layer.router.n_experts == layer.dispatch.n_experts, at, "expert counts disagree")
    _check(1 <= layer.dispatch.rows_per_token <= nxt, layer.dispatch.origin, "rows per token out of range")
    pl = layer.placement
    _check(len(pl.expert_to_rank) == ex.n_ffn, pl.origin, "one rank per routed FFN expert")
    _check(all(0 <= r < pl.expert_parallel for r in pl.expert_to_rank), pl.origin, "rank out of range")
    _check(layer.d_model % layer.heads == 0, at, "heads must divide d_model")
    _check(layer.router.d_model == ex.d_model == layer.inner_d_model, at, "d_model disagrees")


def verify(program: Program) -> None:
    """Check every invariant of ``program``; raise :class:`IRError` on the first violation."""
    _check(len(program.layers) > 0, program.name, "a program has at least one layer")
    names = [layer.name for layer in program.layers]
    _check(len(set(names)) == len(names), program.name, "layer names must be unique")
    for layer in program.layers:
        verify_layer(layer)
    if (m := program.model) is not None:
        for i, name in enumerate(m.blocks):
            _check(name is None or name in names, m.origin, f"block {i} names no layer of the program")
            _check(name is not None or m.dense_ffn is not None, m.origin, f"dense block {i} has no dense FFN")
        a = m.attention
        _check(a.heads % a.kv_heads == 0 and a.head_dim % 2 == 0, m.origin, "attention heads do not fit")
