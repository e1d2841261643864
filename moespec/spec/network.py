"""The network of a spec with a `model:` section: which design each block uses, and the
semantic checks of the section (run by :func:`moespec.spec.validate.check`)."""

from __future__ import annotations

from collections.abc import Iterator

from moespec.spec.model import EveryMoE, FirstDenseMoE, ListMoE
from moespec.spec.routers.base import Path, Problem
from moespec.spec.schema import LayerSpec, Spec

# Per-token inputs a router may read that the network supplies (the model's input_ids, and
# the routing state carried from the previous MoE block); see moespec/runtime/carry.py.
NETWORK_INPUTS = ("input_ids", "prev_router_logits")


def moe_layer_names(spec: Spec) -> list[str]:
    """The layer design (`layer` or a group name) of each MoE block, in block order."""
    assert spec.model is not None
    m = spec.model
    if m.moe_layers is not None:
        return list(m.moe_layers)
    if not spec.groups:
        return ["layer"] * len(m.moe_indices())
    return [g.name for g in spec.groups for _ in range(g.count)]


def block_plan(spec: Spec) -> list[str | None]:
    """Per block: the name of its MoE layer design, or None for a dense block."""
    assert spec.model is not None
    plan: list[str | None] = [None] * spec.model.blocks
    for i, name in zip(spec.model.moe_indices(), moe_layer_names(spec), strict=False):
        plan[i] = name
    return plan


def head_dim(spec: Spec) -> int:
    """The attention's head width (its `head_dim`, or d_model / heads)."""
    assert spec.model is not None
    a = spec.model.attention
    return a.head_dim if a.head_dim is not None else spec.d_model // a.heads


def _check_pattern(spec: Spec) -> Iterator[Problem]:
    m = spec.model
    assert m is not None
    at, pat, n = ("model", "moe_blocks"), m.moe_blocks, m.blocks
    if isinstance(pat, EveryMoE) and pat.offset >= n:
        yield (*at, "offset"), f"offset={pat.offset} is past the last block (blocks={n})"
    if isinstance(pat, FirstDenseMoE) and pat.count >= n:
        yield (*at, "count"), f"count={pat.count} leaves no MoE block among the {n} blocks"
    if isinstance(pat, ListMoE):
        for i, b in enumerate(pat.blocks):
            if not 0 <= b < n:
                yield (*at, "blocks", i), f"block {b} is outside 0..{n - 1}"
        if any(b <= a for a, b in zip(pat.blocks, pat.blocks[1:], strict=False)):
            yield (*at, "blocks"), "block indices must increase"
    if len(m.moe_indices()) < n and m.dense_ffn is None:
        yield ("model",), "some blocks are dense (see `moe_blocks`); give their FFN as `dense_ffn:`"


def _check_assignment(spec: Spec) -> Iterator[Problem]:
    m = spec.model
    assert m is not None
    n_moe = len(m.moe_indices())
    names = {g.name for g in spec.groups} or {"layer"}
    if m.moe_layers is not None:
        if len(m.moe_layers) != n_moe:
            yield ("model", "moe_layers"), f"lists {len(m.moe_layers)} layer designs for {n_moe} MoE blocks"
        for i, name in enumerate(m.moe_layers):
            if name not in names and name != "layer":
                yield ("model", "moe_layers", i), f"no layer design {name!r}; the spec has {sorted(names)}"
    elif spec.groups and sum(g.count for g in spec.groups) != n_moe:
        counts = " + ".join(str(g.count) for g in spec.groups)
        yield (
            ("groups",),
            f"the groups' counts ({counts}) must add up to the model's {n_moe} MoE blocks, or name each "
            "block's design in `model.moe_layers`",
        )


def _layer_of(spec: Spec, name: str) -> LayerSpec | None:
    if name == "layer":
        return spec.layer
    return next((g.layer for g in spec.groups if g.name == name), None)


def _design_path(spec: Spec, name: str) -> Path:
    """Where a design's problem is shown: its `moe_layers` list, else its group (or `layer`)."""
    if spec.model is not None and spec.model.moe_layers is not None:
        return ("model", "moe_layers")
    names = [g.name for g in spec.groups]
    return ("groups", names.index(name)) if name in names else ("layer",)


def _check_layers(spec: Spec) -> Iterator[Problem]:
    """What each MoE block's layer needs from the network: causal routing in a decoder, inputs
    the network can supply, and routing state from a previous block that fits."""
    m = spec.model
    assert m is not None
    prev: LayerSpec | None = None
    seen: set[tuple[str, str]] = set()
    for name in moe_layer_names(spec):
        layer = _layer_of(spec, name)
        if layer is None:
            continue  # reported by _check_assignment
        at = _design_path(spec, name)
        problems: list[Problem] = []
        if m.kind == "decoder_lm" and not layer.router.causal:
            problems.append(
                (
                    ("model", "kind"),
                    f"the {layer.router.kind} router of design {name!r} is not causal (a token's routing "
                    "depends on later tokens), so a decoder LM would see the future",
                )
            )
        reads_prev = any(e.name == "prev_router_logits" for e in layer.router.extra_inputs(layer))
        if reads_prev and prev is not None and prev.experts.n_routed != layer.experts.n_routed:
            problems.append(
                (
                    at,
                    f"design {name!r} adds the previous MoE block's router logits ({prev.experts.n_routed} "
                    f"experts) to its own ({layer.experts.n_routed}); they must have as many experts",
                )
            )
        for p in problems:
            if (str(p[0]), p[1]) not in seen:
                seen.add((str(p[0]), p[1]))
                yield p
        prev = layer


def check_model(spec: Spec) -> Iterator[Problem]:
    """Every semantic problem of the `model:` section (nothing without one)."""
    m = spec.model
    if m is None:
        return
    if m.pad_token_id is not None and m.pad_token_id >= m.vocab_size:
        message = f"pad_token_id={m.pad_token_id} is not below vocab_size={m.vocab_size}"
        yield ("model", "pad_token_id"), message
    a = m.attention
    if a.kv_heads is not None and a.heads % a.kv_heads:
        yield ("model", "attention", "kv_heads"), f"kv_heads={a.kv_heads} does not divide heads={a.heads}"
    if a.head_dim is None and spec.d_model % a.heads:
        yield (
            ("model", "attention", "heads"),
            f"heads={a.heads} does not divide d_model={spec.d_model}; give `head_dim:`",
        )
    elif head_dim(spec) % 2:
        field = "head_dim" if a.head_dim is not None else "heads"
        message = f"RoPE rotates pairs of features: the head width {head_dim(spec)} must be even"
        yield ("model", "attention", field), message
    yield from _check_pattern(spec)
    yield from _check_assignment(spec)
    yield from _check_layers(spec)
