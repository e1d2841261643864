"""Cross-field (semantic) checks that pydantic field constraints cannot express.

Each check yields ``(path, message)`` pairs; :mod:`moespec.spec.load` turns them into
located diagnostics, so they print exactly like schema errors. Checks run only on a spec that
passed the schema, and all of them run, so every problem is reported at once.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator

from moespec.spec.experts import FFNSpec
from moespec.spec.network import check_model
from moespec.spec.routers.base import Path, Problem
from moespec.spec.schedules import curve_values, round_half_even
from moespec.spec.schema import LayerSpec, Spec, inner_d_model

MAX_NUMEL = 2**63 - 1  # a tensor's element count is an int64

# One tensor the layer would hold: its name, shape, and the spec fields (path, value) its
# size comes from; an oversized tensor is blamed on the largest of them.
Tensor = tuple[str, tuple[int, ...], list[tuple[Path, int]]]


def _check_glu_options(ffn: FFNSpec, at: Path) -> Iterator[Problem]:
    """The clamped-GLU options (`limit`, `alpha`, `up_offset`) need `glu`; `alpha` needs silu."""
    opts = ffn.glu_options
    for name in opts if ffn.kind != "glu" else ():
        yield (*at, name), f"`{name}` is an option of the gated form; this block is kind: {ffn.kind}"
    for name in ("alpha", "gate_softcap"):
        if ffn.kind == "glu" and name in opts and ffn.activation != "silu":
            yield (*at, name), f"`{name}` is an option of SiLU; this block's activation is {ffn.activation}"


def _check_layer(spec: Spec, layer: LayerSpec, at: Path) -> Iterator[Problem]:
    for i, grp in enumerate(layer.experts.routed):
        yield from _check_glu_options(grp, (*at, "experts", "routed", i))
    if layer.experts.shared is not None:
        yield from _check_glu_options(layer.experts.shared, (*at, "experts", "shared"))
    for i, grp in enumerate(layer.experts.routed):
        if grp.d_ff % grp.granularity:
            yield (
                (*at, "experts", "routed", i, "granularity"),
                (f"granularity={grp.granularity} does not divide d_ff={grp.d_ff}"),
            )
    yield from layer.router.checks(layer, (*at, "router"))
    lb = layer.losses.load_balance
    if getattr(lb, "count", "selection") == "unbiased_topk" and not layer.router.topk_of_scores:
        yield (
            (*at, "losses", "load_balance", "count"),
            f"`unbiased_topk` counts the plain top-k of a `topk` router's scores; the "
            f"{layer.router.kind} router has no such top-k (use `selection`)",
        )
    z = layer.losses.z_loss
    if lb is not None and z is not None and (lb.scope == "global") != (z.scope == "global"):
        yield (
            (*at, "losses", "z_loss", "scope"),
            f"the balance loss's scope is {lb.scope!r} and the z-loss's {z.scope!r}: a layer's losses "
            "and statistics share one token set, so `global` goes on both or neither",
        )
    if layer.multi_head is not None:
        h = layer.multi_head.heads
        if spec.d_model % h:
            yield (*at, "multi_head", "heads"), f"heads={h} does not divide d_model={spec.d_model}"
        if lowering_inputs(layer):
            yield (
                (*at, "multi_head"),
                (
                    f"multi-head MoE splits tokens into sub-tokens; the {layer.router.kind} router's "
                    f"per-token inputs ({', '.join(lowering_inputs(layer))}) have no sub-token form"
                ),
            )
    yield from _check_schedules(layer, at)
    yield from _check_sizes(spec, layer, at)
    router_dtype = layer.router.own_dtype
    if router_dtype is not None:
        yield from _check_dtype(spec, router_dtype, (*at, "router", "dtype"))
    ep = spec.placement.expert_parallel
    n_ffn = layer.experts.n_ffn
    if n_ffn % ep:
        yield (
            ("placement", "expert_parallel"),
            (
                f"expert_parallel={ep} does not divide the {n_ffn} routed FFN experts"
                + (f" of layer {at[1]}" if at[0] == "groups" else "")
            ),
        )
    mapping = spec.placement.mapping
    if isinstance(mapping, list) and len(mapping) != n_ffn:
        yield (
            ("placement", "mapping"),
            (f"explicit mapping lists {len(mapping)} ranks but the layer has {n_ffn} routed FFN experts"),
        )


def _tensors(spec: Spec, layer: LayerSpec, at: Path) -> Iterator[Tensor]:
    """The layer's largest tensors by shape (the parameter table of ``moespec.ir.params``,
    which spec/ may not import, reduced to what can grow: weights, not biases)."""
    d = inner_d_model(layer, spec.d_model)
    dm: tuple[Path, int] = (("d_model",), spec.d_model)
    ex = layer.experts
    counts = [((*at, "experts", "routed", g, "count"), grp.count) for g, grp in enumerate(ex.routed)]
    counts += [
        ((*at, "experts", "zero_compute", z, "count"), zc.count) for z, zc in enumerate(ex.zero_compute)
    ]
    own = [((*at, "router", k), v) for k, v in layer.router if type(v) is int]
    for name, p in layer.router.params(layer, d).items():
        # Its dimensions are d_model, the number of experts (the counts add up) or its own fields.
        yield name, p.shape, [f for f in [dm, *own] if f[1] in p.shape] + counts
    for g, grp in enumerate(ex.routed):
        where = (*at, "experts", "routed", g)
        blame = [((*where, "count"), grp.count), ((*where, "d_ff"), grp.d_ff), dm]
        yield f"experts.{g}.w_up", (grp.n_experts, grp.width, d), blame
    if ex.shared is not None:
        where = (*at, "experts", "shared")
        blame = [((*where, "count"), ex.shared.count), ((*where, "d_ff"), ex.shared.d_ff), dm]
        yield "shared.w_up", (ex.shared.count, ex.shared.d_ff, d), blame
    for z, zc in enumerate(ex.zero_compute):
        if zc.kind == "constant":
            yield f"zero_compute.{z}.w_c", (zc.count, 2, d), [counts[len(ex.routed) + z], dm]
    if layer.multi_head is not None:
        yield "multi_head.w_in", (spec.d_model, spec.d_model), [dm]


def _check_sizes(spec: Spec, layer: LayerSpec, at: Path) -> Iterator[Problem]:
    """Every tensor must have at most 2^63 - 1 elements, or building it fails (OverflowError).
    An oversized tensor is blamed on its largest field; each field is reported once, with
    the largest tensor it makes too big."""
    worst: dict[Path, tuple[int, str, int]] = {}
    for name, shape, blame in _tensors(spec, layer, at):
        numel = math.prod(shape)
        if numel > MAX_NUMEL:
            path, value = max(blame, key=lambda f: f[1])
            worst[path] = max(worst.get(path, (0, "", 0)), (numel, name, value))
    for path, (numel, name, value) in worst.items():
        message = f"{path[-1]}={value} makes {name} {numel:.3g} elements, more than a tensor can hold"
        yield path, f"{message} (2^63 - 1)"


def lowering_inputs(layer: LayerSpec) -> list[str]:
    """Per-token inputs besides x a layer's router reads (input_ids, prev_router_logits)."""
    return [e.name for e in layer.router.extra_inputs(layer)]


def _check_schedules(layer: LayerSpec, at: Path) -> Iterator[Problem]:
    allowed = layer.router.schedulable()
    seen: set[str] = set()
    for i, sched in enumerate(layer.schedules):
        where = (*at, "schedules", i)
        field = sched.param.removeprefix("router.")
        if field not in allowed:
            names = ", ".join(f"router.{f}" for f in allowed) or "nothing"
            yield (
                (*where, "param"),
                f"{sched.param} cannot be scheduled for a {layer.router.kind} router ({names} can)",
            )
            continue
        if sched.param in seen:
            yield (*where, "param"), f"{sched.param} is scheduled twice"
        seen.add(sched.param)
        values = curve_values(sched)
        if allowed[field] is int:
            top = getattr(layer.router, field)
            if not all(1 <= round_half_even(v) <= top for v in values):
                yield where, f"{sched.param} must stay in 1..{top} (the spec's value is the compiled maximum)"
        elif any(v <= 0 for v in values):
            yield where, f"{sched.param} must stay > 0"
        if sched.kind == "exponential" and min(values) <= 0:
            yield where, "an exponential schedule needs start and end > 0"
        if sched.kind == "multistep":
            if len(sched.values) != len(sched.milestones) + 1:
                yield (*where, "values"), "multistep needs one more value than milestones"
            if any(b <= a for a, b in zip(sched.milestones, sched.milestones[1:], strict=False)):
                yield (*where, "milestones"), "milestones must increase"


def _check_dtype(spec: Spec, dtype: str, at: Path) -> Iterator[Problem]:
    t = spec.target
    if t.backend == "triton" and dtype == "fp64":
        yield at, "the triton backend supports fp32, bf16 and fp16, not fp64"


def _check_placement(spec: Spec) -> Iterator[Problem]:
    p = spec.placement
    if not isinstance(p.mapping, list):
        return
    for i, rank in enumerate(p.mapping):
        if not 0 <= rank < p.expert_parallel:
            yield ("placement", "mapping", i), f"rank {rank} is outside 0..{p.expert_parallel - 1}"
    counts = Counter(p.mapping)
    per_rank = len(p.mapping) // p.expert_parallel if p.expert_parallel else 0
    uneven = {r: c for r, c in sorted(counts.items()) if c != per_rank}
    if len(p.mapping) % p.expert_parallel == 0 and uneven and all(0 <= r < p.expert_parallel for r in counts):
        yield (
            ("placement", "mapping"),
            (f"each rank must hold {per_rank} experts; got {dict(sorted(counts.items()))}"),
        )


def _check_target(spec: Spec) -> Iterator[Problem]:
    t = spec.target
    # Triton kernels run on the CPU only under Triton's interpreter (how the tests run them).
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if t.backend == "triton" and t.device != "cuda" and not interpreting:
        yield (
            ("target", "backend"),
            "the triton backend needs device: cuda (device: cpu only under Triton's interpreter, "
            "TRITON_INTERPRET=1)",
        )
    if t.device == "cpu" and t.arch != "auto":
        yield ("target", "arch"), f"arch {t.arch!r} is a GPU architecture; use auto for device: cpu"
    yield from _check_dtype(spec, t.dtype, ("target", "dtype"))
    yield from _check_dtype(spec, t.router_dtype, ("target", "router_dtype"))


def check(spec: Spec) -> list[Problem]:
    """Every semantic problem of a schema-valid spec."""
    problems: list[Problem] = []
    problems += _check_layer(spec, spec.layer, ("layer",))
    for i, g in enumerate(spec.groups):
        problems += _check_layer(spec, g.layer, ("groups", i, "layer"))
    names = Counter(g.name for g in spec.groups)
    for i, g in enumerate(spec.groups):
        if names[g.name] > 1:
            problems.append((("groups", i, "name"), f"duplicate group name {g.name!r}"))
            names[g.name] = 0  # report each duplicate name once
    problems += _check_placement(spec)
    problems += _check_target(spec)
    problems += check_model(spec)
    # The same base-layer problem surfaces once per group that inherits it; keep one.
    seen: set[tuple[Path, str]] = set()
    return [p for p in problems if not (p in seen or seen.add(p))]
