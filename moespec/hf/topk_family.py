"""The general top-k adapter factory: one router projection, softmax or sigmoid scores, an
optional selection-only correction bias, renormalisation, a scaling factor, the fused v5
experts and an optional shared-expert MLP (gated by sigmoid(x w) or not, S experts fused in
one FFN of width S·F). Each option names the config field it comes from, so an adapter is a
list of names read from the family's modeling code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from moespec.hf.common import (
    activation,
    all_layers,
    empty_shared_mlp,
    field,
    fused_experts,
    glu,
    router_weight,
    shared_mlp,
    topk,
)
from moespec.hf.layout import Rule
from moespec.hf.registry import STANDARD_EXPERTS, Config, Family


@dataclass(frozen=True)
class Shared:
    """A shared-expert MLP at ``attr`` (gate_proj, up_proj, down_proj): ``count`` experts (a
    config field, or an int) fused in one FFN of ``count``·``width``; ``gate``: its output is
    scaled by sigmoid(x w) with w at ``gate``.weight [1, D] (Qwen-MoE's shared_expert_gate)."""

    attr: str
    width: str
    count: str | int = 1
    gate: str | None = None
    always: bool = False


def _value(c: Config, v: str | int | bool | None) -> int | bool | None:
    return field(c, v) if isinstance(v, str) else v


def topk_family(
    name: str,
    block: str,
    *,
    router: str = "gate",
    router_key: str | None = None,
    experts: str = "num_experts",
    width: str = "moe_intermediate_size",
    score: str = "softmax",
    order: str = "softmax_then_topk",
    renorm: str | bool = "norm_topk_prob",
    scaling: str | None = None,
    bias: tuple[str, tuple] | None = None,
    groups: str | None = None,
    shared: Shared | None = None,
    layers: Callable[[Config], list[int]] = all_layers,
    check: Callable[[Config], None] = lambda c: None,
    notes: tuple[str, ...] = (),
    act: str | None = None,
    k: str = "num_experts_per_tok",
    experts_rules: Callable[[], tuple[Rule, ...]] = fused_experts,
    experts_flags: dict[str, bool] | None = None,
) -> Family:
    """A top-k family (see the module docstring). ``renorm`` / ``scaling``: a config field's
    name or a constant; ``router_key``: the router projection's key when it is not
    ``<router>.weight``; ``bias``: (key, its shape) of a frozen selection-only correction bias;
    ``groups``: group-limited selection scored by ``top2_sum`` or ``max`` (fields n_group,
    topk_group); ``act``: the experts' activation when the modeling code fixes it (else the
    config's ``hidden_act``); ``k``: the field of the experts per token; ``experts_rules`` /
    ``experts_flags``: the routed experts' layout when it is not the fused v5 one."""

    def act_of(c: Config) -> str:
        return act if act is not None else activation(c)

    def layer(c: Config) -> dict:
        r = topk(field(c, k), score=score)
        if score == "softmax":
            r["order"] = order
        if order == "softmax_then_topk":
            r["renormalize"] = bool(_value(c, renorm))
        if scaling is not None:
            r["scaling_factor"] = float(field(c, scaling))
        if bias is not None:
            r["expert_bias"] = {"update_rate": 0.0}
        if groups is not None:
            r["groups"] = {
                "n_groups": field(c, "n_group"),
                "topk_groups": field(c, "topk_group"),
                "group_score": groups,
            }
        out = {"experts": {"routed": [glu(field(c, experts), field(c, width), act_of(c))]}, "router": r}
        if shared is not None and _value(c, shared.count):
            sh = {"kind": "glu", "activation": act_of(c), "d_ff": field(c, shared.width)}
            out["experts"]["shared"] = {
                **sh,
                "count": _value(c, shared.count),
                "gate": shared.gate is not None,
            }
        return out

    def dims(c: Config) -> dict[str, int]:
        d = {"E": field(c, experts), "F": field(c, width), "D": field(c, "hidden_size")}
        if shared is not None:
            d.update(S=_value(c, shared.count), Fs=field(c, shared.width))
        return d

    def rules(c: Config) -> tuple[Rule, ...]:
        out: tuple[Rule, ...] = (router_weight(router_key or f"{router}.weight"), *experts_rules())
        if bias is not None:
            out += (Rule(bias[0], bias[1], ("router.expert_bias",), ("E",), view=("E",)),)
        if shared is not None and not _value(c, shared.count) and shared.always:
            out += empty_shared_mlp(shared.attr)
        if shared is not None and _value(c, shared.count):
            out += shared_mlp(shared.attr)
            if shared.gate is not None:
                out += (Rule(f"{shared.gate}.weight", (1, "D"), ("shared.gate",), ("D",), view=("D",)),)
        return out

    sources = {
        "layer.experts.routed.0.count": experts,
        "layer.experts.routed.0.d_ff": width,
        "layer.router.k": k,
    }
    if act is None:
        sources["layer.experts.routed.0.activation"] = "hidden_act"
    if isinstance(renorm, str) and order == "softmax_then_topk":
        sources["layer.router.renormalize"] = renorm
    if scaling is not None:
        sources["layer.router.scaling_factor"] = scaling
    if groups is not None:
        sources.update(
            {"layer.router.groups.n_groups": "n_group", "layer.router.groups.topk_groups": "topk_group"}
        )
    if bias is not None:
        sources["layer.router.expert_bias"] = f"{bias[0]} (a frozen buffer)"
    if shared is not None:
        sources.update(
            {"layer.experts.shared.d_ff": shared.width, "layer.experts.shared.activation": "hidden_act"}
        )
        if isinstance(shared.count, str):
            sources["layer.experts.shared.count"] = shared.count
    flags = dict(STANDARD_EXPERTS) if experts_flags is None else experts_flags
    return Family(
        name,
        (block,),
        router,
        layer,
        dims,
        rules,
        layers,
        check,
        notes=notes,
        sources=sources,
        experts_flags=flags,
    )


def by_config(pick: Callable[[Config], Family], base: Family, **changes: object) -> Family:
    """One adapter whose maths follows the config: ``pick(config)`` gives the variant
    (families built by :func:`topk_family` with the same name and block); ``base`` gives the
    rest (router name, layers, checks, notes), ``changes`` override it (sources)."""
    return replace(
        base,
        layer=lambda c: pick(c).layer(c),
        dims=lambda c: pick(c).dims(c),
        rules=lambda c: pick(c).rules(c),
        **changes,
    )
