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
"""

from __future__ import annotations

from torch import Tensor

from moespec.hf.common import field, topk
from moespec.hf.layout import Rule
from moespec.hf.registry import Config, Family, register


def _layer(c: Config) -> dict:
    routed = {
        "kind": "glu", "activation": "silu", "d_ff": field(c, "intermediate_size"),
        "count": field(c, "num_local_experts"), "bias": True, "limit": float(field(c, "swiglu_limit")),
        "alpha": float(field(c, "swiglu_alpha")), "up_offset": 1.0,
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
