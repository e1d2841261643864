"""Adapters for the softmax top-k families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and the
DeepSeek families (V2: softmax, group max, scaling; V3: sigmoid, group top-2 sum,
selection-only correction bias, renormalisation, scaling, fused shared experts).

Each router's maths is read from the family's transformers modeling code (v5):
- Mixtral: softmax(x Wᵀ) in fp32, top-k, renormalised over the k (always).
- Qwen2-MoE / Qwen3-MoE / OLMoE: softmax in fp32, top-k, renormalised iff ``norm_topk_prob``;
  Qwen2-MoE adds a shared expert scaled by sigmoid(x w_gate).
- DeepSeek-V2: softmax in fp32; ``greedy`` top-k, or ``group_limited_greedy`` (group score =
  max, masked scores 0.0, which equals -inf masking since softmax scores are > 0); weights
  times ``routed_scaling_factor``, never renormalised; S shared experts fused in one FFN.
- DeepSeek-V3: sigmoid in fp32; selection by sigmoid + e_score_correction_bias, groups scored
  by the sum of their two best biased scores, unselected groups masked -inf; weights are the
  unbiased sigmoids, renormalised iff ``norm_topk_prob`` (+1e-20), times the scaling factor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moespec.hf.common import (
    activation,
    after_dense,
    empty_shared_mlp,
    field,
    fused_experts,
    glu,
    refuse,
    router_weight,
    shared_mlp,
    sparse_step_layers,
    topk,
)
from moespec.hf.layout import Rule
from moespec.hf.registry import Config, Family, register
from moespec.hf.topk_family import Shared, topk_family

JITTER = (
    "multiplies the block's input (router and experts) by U(1-eps, 1+eps) while training; "
    "moespec's jitter only touches the router input"
)

BIAS_FROZEN = (
    "transformers keeps the correction bias frozen (a buffer nothing updates); the moespec layer "
    "holds it as router.expert_bias with update_rate 0, so it stays frozen too"
)


# --- factories: one adapter per family, several families per shape ---------------------------


def softmax_family(
    name: str, block: str, *, qwen_shared: bool = False, renorm: str | bool = "norm_topk_prob", **kw: Any
) -> Family:
    """A softmax top-k family (:func:`topk_family`'s options); with ``qwen_shared`` Qwen-MoE's
    shared expert MLP scaled by sigmoid(x w) (``shared_expert``, ``shared_expert_gate``)."""
    shared = Shared("shared_expert", "shared_expert_intermediate_size", gate="shared_expert_gate")
    return topk_family(name, block, renorm=renorm, shared=shared if qwen_shared else None, **kw)


def deepseek_v2_family(name: str, block: str, layers: Callable[[Config], list[int]]) -> Family:
    """DeepSeek-V2's router (softmax; greedy or group-limited by group max; scaled, never
    renormalised) and S shared experts fused in one FFN."""

    def layer(c: Config) -> dict:
        router = topk(
            field(c, "num_experts_per_tok"),
            score="softmax",
            scaling_factor=float(field(c, "routed_scaling_factor")),
        )
        if field(c, "topk_method") == "group_limited_greedy":
            groups = {
                "n_groups": field(c, "n_group"),
                "topk_groups": field(c, "topk_group"),
                "group_score": "max",
            }
            router["groups"] = groups
        return _with_shared(c, "num_experts", router)

    def check(c: Config) -> None:
        refuse(
            c,
            "topk_method",
            lambda v: v not in ("greedy", "group_limited_greedy"),
            "moespec knows greedy and group_limited_greedy",
        )
        refuse(c, "mlp_bias", bool, "the shared experts' biases are not mapped")

    sources = {**_DEEPSEEK_SOURCES, "layer.experts.routed.0.count": "num_experts"}
    sources["layer.router.groups"] = "topk_method, n_group, topk_group"
    return Family(
        name, (block,), "gate", layer, lambda c: _deepseek_dims(c, "num_experts"),
        lambda c: _deepseek_rules(c, bias=False), layers, check, sources=sources,
    )  # fmt: skip


def deepseek_v3_family(name: str, block: str, layers: Callable[[Config], list[int]]) -> Family:
    """DeepSeek-V3's router (sigmoid; selection by sigmoid + frozen correction bias, groups
    by top-2 sum, -inf masking; unbiased weights, renormalised iff norm_topk_prob, scaled)
    and S shared experts fused in one FFN."""

    def layer(c: Config) -> dict:
        router = topk(
            field(c, "num_experts_per_tok"),
            score="sigmoid",
            renormalize=bool(field(c, "norm_topk_prob")),
            scaling_factor=float(field(c, "routed_scaling_factor")),
            groups={
                "n_groups": field(c, "n_group"),
                "topk_groups": field(c, "topk_group"),
                "group_score": "top2_sum",
            },
            expert_bias={"update_rate": 0.0},
        )
        return _with_shared(c, "num_local_experts", router)

    sources = {
        **_DEEPSEEK_SOURCES,
        "layer.experts.routed.0.count": "num_local_experts",
        "layer.router.renormalize": "norm_topk_prob",
        "layer.router.groups.n_groups": "n_group",
        "layer.router.groups.topk_groups": "topk_group",
        "layer.router.expert_bias": "e_score_correction_bias (a frozen buffer)",
    }
    return Family(
        name, (block,), "gate", layer, lambda c: _deepseek_dims(c, "num_local_experts"),
        lambda c: _deepseek_rules(c, bias=True), layers, notes=(BIAS_FROZEN,), sources=sources,
    )  # fmt: skip


_DEEPSEEK_SOURCES = {
    "layer.experts.routed.0.d_ff": "moe_intermediate_size",
    "layer.experts.routed.0.activation": "hidden_act",
    "layer.experts.shared.count": "n_shared_experts",
    "layer.experts.shared.activation": "hidden_act",
    "layer.experts.shared.d_ff": "moe_intermediate_size",
    "layer.router.k": "num_experts_per_tok",
    "layer.router.scaling_factor": "routed_scaling_factor",
}


def _with_shared(c: Config, experts: str, router: dict) -> dict:
    routed = glu(field(c, experts), field(c, "moe_intermediate_size"), activation(c))
    layer = {"experts": {"routed": [routed]}, "router": router}
    if field(c, "n_shared_experts"):
        shared = {"kind": "glu", "activation": activation(c), "d_ff": field(c, "moe_intermediate_size")}
        layer["experts"]["shared"] = {**shared, "count": field(c, "n_shared_experts")}
    return layer


def _deepseek_dims(c: Config, experts: str) -> dict[str, int]:
    f = field(c, "moe_intermediate_size")
    return {
        "E": field(c, experts),
        "F": f,
        "D": field(c, "hidden_size"),
        "S": field(c, "n_shared_experts"),
        "Fs": f,
    }


def _deepseek_rules(c: Config, bias: bool) -> tuple[Rule, ...]:
    rules: tuple[Rule, ...] = (router_weight(), *fused_experts())
    if bias:
        rules += (Rule("gate.e_score_correction_bias", ("E",), ("router.expert_bias",), ("E",)),)
    # DeepSeek's block builds its shared MLP (width S·F) even for S = 0.
    rules += (
        shared_mlp("shared_experts") if field(c, "n_shared_experts") else empty_shared_mlp("shared_experts")
    )
    return rules


def sparse_layer_types(c: Config) -> list[int]:
    """Layers whose ``mlp_layer_types`` entry is ``"sparse"`` (none while it is unset: a
    text config that its composite config fills in)."""
    return [i for i, t in enumerate(field(c, "mlp_layer_types") or ()) if t == "sparse"]


def mixtral_check(c: Config) -> None:
    refuse(c, "router_jitter_noise", lambda v: v > 0, JITTER)


# --- the families read for the first adapters ------------------------------------------------

for _fam in (
    softmax_family(
        "mixtral", "MixtralSparseMoeBlock", experts="num_local_experts", width="intermediate_size",
        renorm=True, check=mixtral_check,
    ),
    softmax_family("qwen2_moe", "Qwen2MoeSparseMoeBlock", qwen_shared=True, layers=sparse_step_layers),
    softmax_family("qwen3_moe", "Qwen3MoeSparseMoeBlock", layers=sparse_step_layers),
    softmax_family("olmoe", "OlmoeSparseMoeBlock", width="intermediate_size"),
    deepseek_v2_family("deepseek_v2", "DeepseekV2Moe", after_dense()),
    deepseek_v3_family("deepseek_v3", "DeepseekV3MoE", after_dense()),
):  # fmt: skip
    register(_fam)
