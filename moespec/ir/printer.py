"""A stable text form of the IR (``moespec explain --ir``; diffable in tests)."""

from __future__ import annotations

from moespec.ir.nodes import ModelNode, MoELayerNode, Program
from moespec.spec.base import Strict


def _opts(obj: Strict | None) -> str:
    if obj is None:
        return "none"
    data = obj.model_dump(mode="json", exclude_defaults=False)
    kind = data.pop("kind", None)
    body = " ".join(f"{k}={_fmt(v)}" for k, v in data.items() if v is not None)
    return f"{kind}({body})" if kind else f"({body})"


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + " ".join(f"{k}={_fmt(x)}" for k, x in v.items() if x is not None) + "}"
    return str(v)


def _ranks(ranks: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, ranks)) + "]" if len(ranks) <= 16 else f"[{ranks[0]},...,{ranks[-1]}]"


def print_layer(layer: MoELayerNode) -> list[str]:
    """The lines of one layer."""
    ex, d = layer.experts, layer.inner_d_model
    lines = [f"layer {layer.name} x{layer.count}  d_model={layer.d_model} dtype={layer.dtype}"]
    if layer.heads > 1:
        lines.append(f"  heads     {layer.heads} sub-tokens of {d} (bias={_fmt(layer.head_bias)})")
    lines.append(
        f"  router    E={layer.router.n_experts} dtype={layer.router.dtype} {_opts(layer.router.config)}"
    )
    lines.append(
        f"  dispatch  rows<=T*{layer.dispatch.rows_per_token} capacity={_opts(layer.dispatch.capacity)}"
    )
    for g in ex.groups:
        last = g.first + g.count - 1
        act = f"{g.kind}({g.activation})"
        lines.append(f"  experts   [{g.first}..{last}] {act} {d}->{g.width}->{d} bias={_fmt(g.bias)}")
    for z in ex.zero_compute:
        lines.append(f"  experts   [{z.first}..{z.first + z.count - 1}] {z.kind}")
    if layer.shared is not None:
        s = layer.shared
        shape = f"{s.kind}({s.activation}) {d}->{s.width}->{d}"
        lines.append(f"  shared    {shape} bias={_fmt(s.bias)} gate={_fmt(s.gate)}")
    lines.append("  combine   weighted_sum")
    lines.append(
        f"  losses    load_balance={_opts(layer.losses.load_balance)} z_loss={_opts(layer.losses.z_loss)}"
    )
    for s in layer.schedules:
        lines.append(f"  schedule  {_opts(s)}")
    pl = layer.placement
    lines.append(f"  placement ep={pl.expert_parallel} ranks={_ranks(pl.expert_to_rank)}")
    return lines


def print_program(program: Program) -> str:
    """The whole program as text, one line per node."""
    head = (
        f"program {program.name} spec={program.spec_hash[:12]} backend={program.backend} "
        f"device={program.device} arch={program.arch} dtype={program.dtype}"
    )
    lines = [head]
    for layer in program.layers:
        lines += print_layer(layer)
    if program.model is not None:
        lines += print_model(program.model)
    return "\n".join(lines) + "\n"


def print_model(m: ModelNode) -> list[str]:
    """The network's lines: sizes, attention, FFNs, and which design each block uses."""
    a, f = m.attention, m.dense_ffn
    head = "tied" if m.tie_embeddings else ("lm_head" if m.kind == "decoder_lm" else f"classes={m.classes}")
    plan = " ".join(name or "dense" for name in m.blocks)
    return [
        f"  model {m.kind} vocab={m.vocab_size} max_seq_len={m.max_seq_len} blocks={len(m.blocks)} "
        f"norm={m.norm}(eps={m.norm_eps}) head={head}" + (f" pool={m.pool}" if m.kind == "encoder" else ""),
        f"    attention heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
        f"rope_theta={a.rope_theta} qk_norm={a.qk_norm} bias={_fmt(a.bias)} causal={_fmt(a.causal)}",
        "    dense_ffn "
        + (f"{f.kind}(activation={f.activation} d_ff={f.d_ff} bias={_fmt(f.bias)})" if f else "none"),
        f"    blocks {plan}",
    ]
