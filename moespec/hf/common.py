"""Pieces most family adapters share: the activation names, config field checks, the fused v5
expert layout, the router and shared-expert rules, and which decoder layers are MoE.

Every function reads the config attributes the family's transformers modeling code reads (the
adapter passes the names), so a renamed field fails loudly rather than being guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moespec.hf.layout import Rule
from moespec.hf.registry import Config, UnsupportedFamilyError

# transformers' ACT2FN name -> moespec activation (the same function, not an approximation).
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def field(config: Config, name: str) -> Any:
    """``config.<name>``; an error naming the field when the config lacks it."""
    if not hasattr(config, name):
        raise UnsupportedFamilyError(
            f"{type(config).__name__} has no field {name!r}, which the adapter reads"
        )
    return getattr(config, name)


def activation(config: Config, name: str = "hidden_act") -> str:
    """The moespec activation of ``config.<name>``; an error naming the field otherwise."""
    act = field(config, name)
    if act not in ACTIVATIONS:
        raise UnsupportedFamilyError(
            f"{type(config).__name__}.{name} = {act!r}: moespec experts have no such activation "
            f"(supported: {sorted(ACTIVATIONS)})"
        )
    return ACTIVATIONS[act]


def refuse(config: Config, name: str, bad: Callable[[Any], bool], why: str) -> None:
    """Raise when ``bad(config.<name>)``: the field changes the MoE maths in a way moespec
    does not express (``why`` says how)."""
    value = getattr(config, name, None)
    if value is not None and bad(value):
        raise UnsupportedFamilyError(f"{type(config).__name__}.{name} = {value!r}: {why}")


def glu(count: int, d_ff: int, act: str, bias: bool = False) -> dict:
    """A routed GLU expert group."""
    return {"kind": "glu", "activation": act, "d_ff": d_ff, "count": count, "bias": bias}


def topk(k: int, **kw: Any) -> dict:
    """A ``topk`` router dict computed in fp32 (transformers' routers take the softmax or the
    sigmoid in fp32)."""
    return {"kind": "topk", "k": k, "dtype": "fp32", **kw}


def fused_experts(prefix: str = "experts") -> tuple[Rule, ...]:
    """transformers v5's fused expert tensors: ``gate_up_proj [E, 2F, D]`` (the F gate rows
    first, then the F up rows: ``chunk(2)``) and ``down_proj [E, D, F]``."""
    return (
        Rule(
            f"{prefix}.gate_up_proj",
            ("E", "2*F", "D"),
            ("experts.0.w_gate", "experts.0.w_up"),
            ("E", "F", "D"),
            split_dim=1,
        ),
        Rule(f"{prefix}.down_proj", ("E", "D", "F"), ("experts.0.w_down",), ("E", "D", "F")),
    )


def router_weight(key: str = "gate.weight") -> Rule:
    """The router projection ``[E, D]`` (logits = x Wᵀ)."""
    return Rule(key, ("E", "D"), ("router.weight",), ("E", "D"))


def shared_mlp(prefix: str, n: str = "S", width: str = "Fs", bias: bool = False) -> tuple[Rule, ...]:
    """A shared-expert MLP of three ``nn.Linear`` (gate_proj, up_proj, down_proj) whose width
    is ``n`` experts of ``width`` fused (DeepSeek fuses its S shared experts into one FFN of
    width S·F: rows s·F .. s·F + F - 1 are shared expert s)."""
    rules = [
        Rule(
            f"{prefix}.gate_proj.weight",
            (f"{n}*{width}", "D"),
            ("shared.w_gate",),
            (n, width, "D"),
            view=(n, width, "D"),
        ),
        Rule(
            f"{prefix}.up_proj.weight",
            (f"{n}*{width}", "D"),
            ("shared.w_up",),
            (n, width, "D"),
            view=(n, width, "D"),
        ),
        Rule(
            f"{prefix}.down_proj.weight",
            ("D", f"{n}*{width}"),
            ("shared.w_down",),
            (n, "D", width),
            view=("D", n, width),
            perm=(1, 0, 2),
        ),
    ]
    if bias:
        rules += [
            Rule(
                f"{prefix}.gate_proj.bias", (f"{n}*{width}",), ("shared.b_gate",), (n, width), view=(n, width)
            ),
            Rule(f"{prefix}.up_proj.bias", (f"{n}*{width}",), ("shared.b_up",), (n, width), view=(n, width)),
            # One fused FFN adds its down bias once; moespec's S shared experts add theirs S
            # times, so only S = 1 maps (the adapter checks).
            Rule(f"{prefix}.down_proj.bias", ("D",), ("shared.b_down",), (1, "D"), view=(1, "D")),
        ]
    return tuple(rules)


def empty_shared_mlp(prefix: str) -> tuple[Rule, ...]:
    """The zero-width shared MLP transformers builds when a config has no shared experts
    (``Linear(D, 0)``): shapes checked, no moespec tensor."""
    return (
        Rule(f"{prefix}.gate_proj.weight", (0, "D"), (), ()),
        Rule(f"{prefix}.up_proj.weight", (0, "D"), (), ()),
        Rule(f"{prefix}.down_proj.weight", ("D", 0), (), ()),
    )


def sparse_step_layers(config: Config) -> list[int]:
    """Qwen-MoE's rule: layer i is MoE unless listed in ``mlp_only_layers``, when
    ``num_experts > 0`` and ``(i + 1) % decoder_sparse_step == 0``."""
    n, step = field(config, "num_hidden_layers"), field(config, "decoder_sparse_step")
    only = set(field(config, "mlp_only_layers") or [])
    return [i for i in range(n) if i not in only and field(config, "num_experts") > 0 and (i + 1) % step == 0]


def all_layers(config: Config) -> list[int]:
    """Every decoder layer is MoE."""
    return list(range(field(config, "num_hidden_layers")))


def after_dense(name: str = "first_k_dense_replace") -> Callable[[Config], list[int]]:
    """DeepSeek's rule: layers from ``config.<name>`` on are MoE."""

    def layers(config: Config) -> list[int]:
        return [i for i in range(field(config, "num_hidden_layers")) if i >= field(config, name)]

    return layers
