"""Cross-field (semantic) checks that pydantic field constraints cannot express.

Each check yields ``(path, message)`` pairs; :mod:`moespec.spec.load` turns them into
located diagnostics, so they print exactly like schema errors. Checks run only on a spec that
passed the schema, and all of them run, so every problem is reported at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from moespec.spec.base import Strict
from moespec.spec.routers import TopKRouter
from moespec.spec.schema import LayerSpec, Spec

Problem = tuple[tuple[str | int, ...], str]
Path = tuple[str | int, ...]

# Router-kind specific checks: kind -> function(layer, router, path_to_router).
ROUTER_CHECKS: dict[str, Callable[[LayerSpec, Strict, Path], Iterator[Problem]]] = {}


def router_check(kind: str):
    """Register a semantic check for one router kind."""

    def deco(fn: Callable[[LayerSpec, Strict, Path], Iterator[Problem]]):
        ROUTER_CHECKS[kind] = fn
        return fn

    return deco


@router_check("topk")
def _check_topk(layer: LayerSpec, r: TopKRouter, at: Path) -> Iterator[Problem]:  # type: ignore[override]
    n = layer.experts.n_routed
    if r.k > n:
        yield (*at, "k"), f"k={r.k} exceeds the number of routed experts ({n})"
    if r.score == "sigmoid" and r.order == "topk_then_softmax":
        yield (*at, "order"), "`topk_then_softmax` needs score: softmax (sigmoid scores have no softmax)"
    if r.second_expert_policy != "all" and r.k != 2:
        yield (
            (*at, "second_expert_policy"),
            f"`{r.second_expert_policy}` is GShard's top-2 policy; it needs k=2 (got k={r.k})",
        )
    if r.groups is not None:
        g = r.groups
        if n % g.n_groups:
            yield (*at, "groups", "n_groups"), f"n_groups={g.n_groups} does not divide the {n} routed experts"
        elif g.group_score == "top2_sum" and n // g.n_groups < 2:
            yield (*at, "groups", "group_score"), "top2_sum needs at least 2 experts per group"
        if g.topk_groups > g.n_groups:
            yield (*at, "groups", "topk_groups"), f"topk_groups={g.topk_groups} exceeds n_groups={g.n_groups}"
        elif n % g.n_groups == 0 and r.k > g.topk_groups * (n // g.n_groups):
            kept = g.topk_groups * (n // g.n_groups)
            yield (*at, "k"), f"k={r.k} exceeds the {kept} experts in the {g.topk_groups} kept groups"
    if r.second_expert_policy != "all" and r.score != "softmax":
        yield (*at, "second_expert_policy"), "GShard's second-expert policies need score: softmax"
    lb = layer.losses.load_balance
    if lb is not None and lb.kind == "importance_load_cv2" and r.noise is None:
        # The smooth load estimator is P(noisy logit stays in the top-k): it needs noise std > 0.
        yield (*at, "noise"), "the importance_load_cv2 loss needs router noise (learned or fixed)"
    if r.jitter and r.noise is not None:
        yield (*at, "jitter"), "use either input jitter or logit noise, not both"


def _check_layer(spec: Spec, layer: LayerSpec, at: Path) -> Iterator[Problem]:
    for i, grp in enumerate(layer.experts.routed):
        if grp.d_ff % grp.granularity:
            yield (
                (*at, "experts", "routed", i, "granularity"),
                (f"granularity={grp.granularity} does not divide d_ff={grp.d_ff}"),
            )
    check = ROUTER_CHECKS.get(layer.router.kind)
    if check is not None:
        yield from check(layer, layer.router, (*at, "router"))
    router_dtype = getattr(layer.router, "dtype", None)
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
    if t.backend == "triton" and t.device != "cuda":
        yield ("target", "backend"), "the triton backend needs device: cuda"
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
    # The same base-layer problem surfaces once per group that inherits it; keep one.
    seen: set[tuple[Path, str]] = set()
    return [p for p in problems if not (p in seen or seen.add(p))]
