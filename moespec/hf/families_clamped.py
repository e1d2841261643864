"""Adapters for families whose experts use the clamped SwiGLU (moespec's ``glu`` with
``limit``, ``alpha`` and ``up_offset``), each read from its transformers 5.25 modeling code:

- GPT-OSS (``gpt_oss``): router ``router`` with a bias, logits x Wᵀ + b, top-k of the logits
  then softmax over the k; experts with biases in the transposed, interleaved layout
  (``gate_up_proj [E, D, 2F]``: x @ W, gate at even columns ``[..., ::2]``, up at odd ones
  ``[..., 1::2]``; ``down_proj [E, F, D]``), h = g·sigmoid(alpha·g)·(u + 1) with g = min(gate,
  limit), u = clamp(up, ±limit) (``swiglu_limit``, ``swiglu_alpha``). The block returns
  ``(output, router_scores)``: the top-k softmax weights [T, K] ride along.
- OpenAI Privacy Filter (``openai_privacy_filter``): GPT-OSS's maths with gate and up
  concatenated (``chunk(2)``) instead of interleaved; its router divides the scores by k and the
  block multiplies the output by k again (moespec's weights are the plain softmax; the block's
  second output is the scores / k, as transformers returns them).
- MiniMax-M3-VL (``minimax_m3_vl``): MiniMax-M2's router (sigmoid, frozen correction bias for
  selection, renormalised; the routed output times ``routed_scaling_factor``, moespec's
  ``scaling_factor``), fused v5 experts and one shared expert (``shared_experts.gate_up_proj``
  [2·Fs, D], gate rows first), all with GPT-OSS's clamped SwiGLU; layers from
  ``mlp_layer_types``.
- GLM-5-Next (``glm5_next``), HY-V4 (``hy_v4``, ``hy_v4_vl``): DeepSeek-V3's router and
  layout, SwiGLU experts clamped by ``swiglu_limit`` (gate ≤ limit, up in ±limit; no alpha, no
  offset); GLM-5-Next clamps its shared experts too, HY-V4 does not. Layers from
  ``mlp_layer_types``.
- Inkling-2 (``inkling2``, ``inkling2_loop``): sigmoid router (``scoring_func``), selection by
  sigmoid + frozen correction bias, renormalised, times ``routed_scaling_factor``; fused v5
  experts with the softcapped SwiGLU c_g·tanh(g/c_g)·sigmoid(g)·c_u·tanh(u/c_u)
  (``mlp_gate_softcap``, ``mlp_up_softcap``: moespec's ``gate_softcap``, ``up_softcap``).
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from moespec.hf.common import field, refuse, topk
from moespec.hf.families_core import deepseek_v3_family, sparse_layer_types
from moespec.hf.layout import Rule
from moespec.hf.registry import Config, Family, register
from moespec.hf.topk_family import topk_family


def _clamp(c: Config) -> dict:
    """GPT-OSS's clamped SwiGLU options of a ``glu`` block."""
    return {
        "limit": float(field(c, "swiglu_limit")),
        "alpha": float(field(c, "swiglu_alpha")),
        "up_offset": 1.0,
    }


def _layer(c: Config) -> dict:
    routed = {
        "kind": "glu", "activation": "silu", "d_ff": field(c, "intermediate_size"),
        "count": field(c, "num_local_experts"), "bias": True, **_clamp(c),
    }  # fmt: skip
    router = topk(field(c, "num_experts_per_tok"), score="softmax", order="topk_then_softmax", bias=True)
    return {"experts": {"routed": [routed]}, "router": router}


def _rules(interleaved: bool):
    def rules(_c: Config) -> tuple[Rule, ...]:
        gate_up = ("experts.0.w_gate", "experts.0.w_up")
        return (
            Rule("router.weight", ("E", "D"), ("router.weight",), ("E", "D")),
            Rule("router.bias", ("E",), ("router.bias",), ("E",)),
            Rule(
                "experts.gate_up_proj", ("E", "D", "2*F"), gate_up, ("E", "F", "D"),
                perm=(0, 2, 1), split_dim=1, interleaved=interleaved,
            ),
            Rule(
                "experts.gate_up_proj_bias", ("E", "2*F"), ("experts.0.b_gate", "experts.0.b_up"),
                ("E", "F"), split_dim=1, interleaved=interleaved,
            ),
            Rule(
                "experts.down_proj", ("E", "F", "D"), ("experts.0.w_down",), ("E", "D", "F"), perm=(0, 2, 1)
            ),
            Rule("experts.down_proj_bias", ("E", "D"), ("experts.0.b_down",), ("E", "D")),
        )  # fmt: skip

    return rules


def _scores(divide_by_k: bool):
    def extra(config: Config, logits_TE: Tensor) -> tuple[Tensor, ...]:
        """The block's second output: softmax over the top-k router logits [T, K] (/ k)."""
        k = field(config, "num_experts_per_tok")
        scores_TK = logits_TE.topk(k, dim=-1).values.softmax(dim=-1)
        return (scores_TK / k if divide_by_k else scores_TK,)

    return extra


def _oai(name: str, block: str, interleaved: bool, divide_by_k: bool) -> Family:
    """GPT-OSS or a family with its MLP (see the module docstring)."""
    return Family(
        name,
        (block,),
        "router",
        _layer,
        lambda c: {
            "E": field(c, "num_local_experts"),
            "F": field(c, "intermediate_size"),
            "D": field(c, "hidden_size"),
        },
        _rules(interleaved),
        lambda c: list(range(field(c, "num_hidden_layers"))),
        sources={
            "layer.experts.routed.0.count": "num_local_experts",
            "layer.experts.routed.0.d_ff": "intermediate_size",
            "layer.experts.routed.0.limit": "swiglu_limit",
            "layer.experts.routed.0.alpha": "swiglu_alpha",
            "layer.router.k": "num_experts_per_tok",
        },
        experts_flags={
            "is_transposed": True,
            "is_concatenated": not interleaved,
            "has_bias": True,
            "has_gate": True,
        },
        extra_outputs=_scores(divide_by_k),
    )


register(_oai("gpt_oss", "GptOssMLP", interleaved=True, divide_by_k=False))
register(_oai("openai_privacy_filter", "OpenAIPrivacyFilterMLP", interleaved=False, divide_by_k=True))


def _minimax_m3() -> Family:
    base = topk_family(
        "minimax_m3_vl", "MiniMaxM3VLSparseMoeBlock", experts="num_local_experts", width="intermediate_size",
        score="sigmoid", renorm=True, scaling="routed_scaling_factor", act="silu",
        bias=("gate.e_score_correction_bias", ("E",)), layers=sparse_layer_types,
    )  # fmt: skip

    def layer(c: Config) -> dict:
        out = base.layer(c)
        out["experts"]["routed"][0].update(_clamp(c))
        shared = {"kind": "glu", "activation": "silu", "d_ff": field(c, "shared_intermediate_size")}
        out["experts"]["shared"] = {**shared, **_clamp(c)}
        return out

    def rules(c: Config) -> tuple[Rule, ...]:
        return (
            *base.rules(c),
            Rule(
                "shared_experts.gate_up_proj.weight", ("2*Fs", "D"), ("shared.w_gate", "shared.w_up"),
                (1, "Fs", "D"), view=(1, "2*Fs", "D"), split_dim=1,
            ),
            Rule(
                "shared_experts.down_proj.weight", ("D", "Fs"), ("shared.w_down",), (1, "D", "Fs"),
                view=(1, "D", "Fs"),
            ),
        )  # fmt: skip

    sources = {
        **base.sources,
        "layer.experts.routed.0.limit": "swiglu_limit",
        "layer.experts.routed.0.alpha": "swiglu_alpha",
        "layer.experts.shared.d_ff": "shared_intermediate_size",
    }
    return replace(
        base,
        layer=layer,
        dims=lambda c: {**base.dims(c), "Fs": field(c, "shared_intermediate_size")},
        rules=rules,
        sources=sources,
    )


register(_minimax_m3())


def limited(fam: Family, shared: bool, limit: str = "swiglu_limit") -> Family:
    """``fam`` with its routed experts (and its shared experts when ``shared``) clamped by the
    config's ``limit`` field (a SwiGLU limit: moespec's ``limit`` option; unset or 0: none)."""

    def layer(c: Config) -> dict:
        out = fam.layer(c)
        value = field(c, limit)
        if value:
            out["experts"]["routed"][0]["limit"] = float(value)
            if shared and "shared" in out["experts"]:
                out["experts"]["shared"]["limit"] = float(value)
        return out

    sources = {**fam.sources, "layer.experts.routed.0.limit": limit}
    if shared:
        sources["layer.experts.shared.limit"] = limit
    return replace(fam, layer=layer, sources=sources)


for _fam in (
    limited(deepseek_v3_family("glm5_next", "Glm5NextTextMoE", sparse_layer_types), shared=True),
    limited(deepseek_v3_family("hy_v4", "HYV4MoE", sparse_layer_types), shared=False),
    limited(deepseek_v3_family("hy_v4_vl", "HYV4VLMoE", sparse_layer_types), shared=False),
):
    register(_fam)


def _inkling2(name: str, block: str) -> Family:
    def check(c: Config) -> None:
        refuse(c, "scoring_func", lambda v: v != "sigmoid", "moespec's routers score by softmax or sigmoid")

    base = topk_family(
        name, block, experts="num_local_experts", score="sigmoid", renorm=True,
        scaling="routed_scaling_factor", bias=("gate.e_score_correction_bias", ("E",)),
        act="silu", check=check,
    )  # fmt: skip

    def layer(c: Config) -> dict:
        out = base.layer(c)
        caps = {
            "gate_softcap": float(field(c, "mlp_gate_softcap")),
            "up_softcap": float(field(c, "mlp_up_softcap")),
        }
        out["experts"]["routed"][0].update(caps)
        return out

    sources = {
        **base.sources,
        "layer.experts.routed.0.gate_softcap": "mlp_gate_softcap",
        "layer.experts.routed.0.up_softcap": "mlp_up_softcap",
    }
    return replace(base, layer=layer, sources=sources)


register(_inkling2("inkling2", "Inkling2SparseMoeBlock"))
register(_inkling2("inkling2_loop", "Inkling2LoopSparseMoeBlock"))
