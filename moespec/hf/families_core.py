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

from moespec.hf.common import (
    activation,
    after_dense,
    all_layers,
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

JITTER = (
    "multiplies the block's input (router and experts) by U(1-eps, 1+eps) while training; "
    "moespec's jitter only touches the router input"
)

BIAS_FROZEN = (
    "transformers keeps the correction bias frozen (a buffer nothing updates); the moespec layer "
    "holds it as router.expert_bias with update_rate 0, so it stays frozen too"
)


# --- Mixtral ------------------------------------------------------------------------------


def _mixtral_dims(c: Config) -> dict[str, int]:
    return {
        "E": field(c, "num_local_experts"),
        "F": field(c, "intermediate_size"),
        "D": field(c, "hidden_size"),
    }


def _mixtral_check(c: Config) -> None:
    refuse(c, "router_jitter_noise", lambda v: v > 0, JITTER)


register(
    Family(
        name="mixtral",
        blocks=("MixtralSparseMoeBlock",),
        router="gate",
        layer=lambda c: {
            "experts": {
                "routed": [glu(field(c, "num_local_experts"), field(c, "intermediate_size"), activation(c))]
            },
            "router": topk(field(c, "num_experts_per_tok"), score="softmax", renormalize=True),
        },
        dims=_mixtral_dims,
        rules=lambda c: (router_weight(), *fused_experts()),
        moe_layers=all_layers,
        check=_mixtral_check,
    )
)


# --- Qwen2-MoE, Qwen3-MoE, OLMoE ------------------------------------------------------------


def _softmax_topk_layer(c: Config, width: str = "moe_intermediate_size") -> dict:
    return {
        "experts": {"routed": [glu(field(c, "num_experts"), field(c, width), activation(c))]},
        "router": topk(
            field(c, "num_experts_per_tok"), score="softmax", renormalize=bool(field(c, "norm_topk_prob"))
        ),
    }


def _qwen_dims(c: Config, width: str = "moe_intermediate_size") -> dict[str, int]:
    return {"E": field(c, "num_experts"), "F": field(c, width), "D": field(c, "hidden_size")}


def _qwen2_layer(c: Config) -> dict:
    layer = _softmax_topk_layer(c)
    layer["experts"]["shared"] = {
        "kind": "glu",
        "activation": activation(c),
        "d_ff": field(c, "shared_expert_intermediate_size"),
        "gate": True,
    }
    return layer


register(
    Family(
        name="qwen2_moe",
        blocks=("Qwen2MoeSparseMoeBlock",),
        router="gate",
        layer=_qwen2_layer,
        dims=lambda c: {**_qwen_dims(c), "S": 1, "Fs": field(c, "shared_expert_intermediate_size")},
        rules=lambda c: (
            router_weight(),
            *fused_experts(),
            *shared_mlp("shared_expert"),
            Rule("shared_expert_gate.weight", (1, "D"), ("shared.gate",), ("D",), view=("D",)),
        ),
        moe_layers=sparse_step_layers,
    )
)

register(
    Family(
        name="qwen3_moe",
        blocks=("Qwen3MoeSparseMoeBlock",),
        router="gate",
        layer=_softmax_topk_layer,
        dims=_qwen_dims,
        rules=lambda c: (router_weight(), *fused_experts()),
        moe_layers=sparse_step_layers,
    )
)

register(
    Family(
        name="olmoe",
        blocks=("OlmoeSparseMoeBlock",),
        router="gate",
        layer=lambda c: _softmax_topk_layer(c, "intermediate_size"),
        dims=lambda c: _qwen_dims(c, "intermediate_size"),
        rules=lambda c: (router_weight(), *fused_experts()),
        moe_layers=all_layers,
    )
)


# --- DeepSeek-V2 / V3 -------------------------------------------------------------------------


def _deepseek_dims(c: Config, experts: str) -> dict[str, int]:
    f = field(c, "moe_intermediate_size")
    return {
        "E": field(c, experts),
        "F": f,
        "D": field(c, "hidden_size"),
        "S": field(c, "n_shared_experts"),
        "Fs": f,
    }


def _shared(c: Config) -> dict:
    return {
        "kind": "glu",
        "activation": activation(c),
        "d_ff": field(c, "moe_intermediate_size"),
        "count": field(c, "n_shared_experts"),
    }


def _v2_layer(c: Config) -> dict:
    method = field(c, "topk_method")
    router = topk(
        field(c, "num_experts_per_tok"),
        score="softmax",
        scaling_factor=float(field(c, "routed_scaling_factor")),
    )
    if method == "group_limited_greedy":
        router["groups"] = {
            "n_groups": field(c, "n_group"),
            "topk_groups": field(c, "topk_group"),
            "group_score": "max",
        }
    layer = {
        "experts": {
            "routed": [glu(field(c, "n_routed_experts"), field(c, "moe_intermediate_size"), activation(c))]
        },
        "router": router,
    }
    if field(c, "n_shared_experts"):
        layer["experts"]["shared"] = _shared(c)
    return layer


def _v2_check(c: Config) -> None:
    refuse(
        c,
        "topk_method",
        lambda v: v not in ("greedy", "group_limited_greedy"),
        "moespec knows greedy and group_limited_greedy",
    )
    refuse(c, "mlp_bias", bool, "the shared experts' biases are not mapped")


def _v3_layer(c: Config) -> dict:
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
    layer = {
        "experts": {
            "routed": [glu(field(c, "n_routed_experts"), field(c, "moe_intermediate_size"), activation(c))]
        },
        "router": router,
    }
    if field(c, "n_shared_experts"):
        layer["experts"]["shared"] = _shared(c)
    return layer


def _deepseek_rules(c: Config, bias: bool) -> tuple[Rule, ...]:
    rules: tuple[Rule, ...] = (router_weight(), *fused_experts())
    if bias:
        rules += (Rule("gate.e_score_correction_bias", ("E",), ("router.expert_bias",), ("E",)),)
    if field(c, "n_shared_experts"):
        rules += shared_mlp("shared_experts")
    return rules


register(
    Family(
        name="deepseek_v2",
        blocks=("DeepseekV2Moe",),
        router="gate",
        layer=_v2_layer,
        dims=lambda c: _deepseek_dims(c, "n_routed_experts"),
        rules=lambda c: _deepseek_rules(c, bias=False),
        moe_layers=after_dense(),
        check=_v2_check,
    )
)

register(
    Family(
        name="deepseek_v3",
        blocks=("DeepseekV3MoE",),
        router="gate",
        layer=_v3_layer,
        dims=lambda c: _deepseek_dims(c, "n_routed_experts"),
        rules=lambda c: _deepseek_rules(c, bias=True),
        moe_layers=after_dense(),
        notes=(BIAS_FROZEN,),
    )
)
