"""Adapters for families with their own router code that the general top-k factory
(:func:`moespec.hf.topk_family.topk_family`) expresses, each read from its transformers
5.25 modeling code:

- Flint: sigmoid(x Wᵀ) in fp32, top-k, renormalised iff ``norm_topk_prob``; an ungated
  shared expert (``shared_expert``).
- Lara-Mini: softmax in fp32, top-k, renormalised iff ``norm_topk_prob``; ungated shared expert.
- MiniMax-M2: sigmoid in fp32; selection by sigmoid + the block's frozen
  ``e_score_correction_bias``; unbiased weights, always renormalised. Mixtral's input jitter.
- HY-V3: as MiniMax-M2 (+1e-20 in the renormalisation), times ``router_scaling_factor``;
  ``num_shared_experts`` shared experts fused in one FFN.
- EXAONE-MoE: DeepSeek-V3's router code (sigmoid, frozen bias, groups by top-2 sum, scaling)
  with its own field names (``num_experts``, ``num_shared_experts``).
- ERNIE-4.5-MoE: softmax in fp32; selection by softmax + the frozen
  ``moe_statics.e_score_correction_bias`` [1, E]; unbiased weights renormalised (the sum
  clamped at ``moe_norm_min``, 1e-12, which only matters when it is that small).
- Mistral-4 / Mistral-Large-4: softmax (in the model dtype / in fp32), groups scored by the
  sum of their two best probabilities (masked 0.0: the same as -inf, probabilities are > 0),
  renormalised iff ``norm_topk_prob`` (Large-4: always), scaled; fused shared experts.
- MiniCPM5-MoE: DeepSeek-V3's block and router code.
- MiMo-V2-Flash: DeepSeek-V3's router code, no shared experts.
- Cohere2-MoE: top-k of the logits, then softmax over the k (``expert_selection_fn:
  softmax``) or their sigmoids, renormalised iff ``norm_topk_prob`` (``sigmoid``: the top-k of
  the logits is the top-k of the sigmoids); fused shared experts summed (the ``average``
  strategy halves the sum, which moespec does not express).
- HunYuan-MoE-V1: softmax (fp32) of ``gate.wg``, top-k, always renormalised; an ungated shared
  MLP (``shared_mlp``) of width ``intermediate_size``.
- Laguna: sigmoid, selection by sigmoid + the router's frozen ``e_score_correction_bias``,
  always renormalised; the routed output times ``moe_routed_scaling_factor`` (the same as
  scaling the weights); ungated shared experts. Logit soft-capping is refused.
- LFM2-MoE: sigmoid (+ the block's frozen ``expert_bias`` for selection iff
  ``use_expert_bias``), renormalised iff ``norm_topk_prob`` with +1e-6 in the denominator
  (moespec adds none: a documented difference below 1e-6 relative), times
  ``routed_scaling_factor``; no shared experts.
- AFMoE: sigmoid of ``router.gate`` (fp32), selection by sigmoid + the block's frozen
  ``expert_bias``, always renormalised (+1e-20), times ``route_scale``; fused shared experts.
- dots.3-note (its text MoE): DeepSeek-V3's router code; shared experts of their own width
  (``shared_experts_intermediate_size``). Its vision MoE (per-layer configs) is not adapted.
- Beam: DeepSeek-V3's router without the scaling, which the block applies to the routed
  output instead (moespec scales the weights: the same output); no shared experts. Its experts
  take the activation in fp32 (the same in fp32 models).
"""

from __future__ import annotations

from moespec.hf.common import after_dense, field, refuse, sparse_step_layers
from moespec.hf.families_core import JITTER, deepseek_v3_family, sparse_layer_types
from moespec.hf.registry import Config, Family, register
from moespec.hf.topk_family import Shared, by_config, topk_family

_FP32_COMBINE = (
    "HY-V3's enable_moe_fp32_combine sums the routed and shared outputs in fp32; moespec sums in "
    "the layer's dtype (the same in fp32 models)"
)


def _ernie_layers(c: Config) -> list[int]:
    """ERNIE-4.5-MoE: (i + 1) % moe_layer_interval == 0, between the start and end indices."""
    step, lo, hi = (
        field(c, n) for n in ("moe_layer_interval", "moe_layer_start_index", "moe_layer_end_index")
    )
    hi = field(c, "num_hidden_layers") - 1 if hi in (None, -1) else hi
    return [i for i in range(field(c, "num_hidden_layers")) if (i + 1) % step == 0 and lo <= i <= hi]


def _jitter(c: Config) -> None:
    refuse(c, "router_jitter_noise", lambda v: v > 0, JITTER)


def _no_mlp_bias(name: str) -> object:
    def check(c: Config) -> None:
        refuse(c, name, bool, "the shared experts' biases are not mapped")

    return check


_SHARED = "shared_expert_intermediate_size"
for _fam in (
    topk_family(
        "flint", "FlintSparseMoeBlock", score="sigmoid", shared=Shared("shared_expert", _SHARED),
        layers=sparse_step_layers,
    ),
    topk_family("lara_mini", "LaraMiniSparseMoeBlock", shared=Shared("shared_expert", _SHARED)),
    topk_family(
        "minimax_m2", "MiniMaxM2SparseMoeBlock", experts="num_local_experts", width="intermediate_size",
        score="sigmoid", renorm=True, bias=("e_score_correction_bias", ("E",)), check=_jitter,
    ),
    topk_family(
        "hy_v3", "HYV3MoE", experts="num_local_experts", score="sigmoid", renorm=True,
        scaling="router_scaling_factor", bias=("e_score_correction_bias", ("E",)),
        shared=Shared("shared_experts", "moe_intermediate_size", count="num_shared_experts", always=True),
        layers=sparse_layer_types, check=_no_mlp_bias("mlp_bias"), notes=(_FP32_COMBINE,),
    ),
    topk_family(
        "exaone_moe", "ExaoneMoeSparseMoEBlock", score="sigmoid", scaling="routed_scaling_factor",
        bias=("gate.e_score_correction_bias", ("E",)), groups="top2_sum",
        shared=Shared("shared_experts", "moe_intermediate_size", count="num_shared_experts", always=True),
        layers=sparse_layer_types,
    ),
    topk_family(
        "ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", renorm=True,
        bias=("gate.moe_statics.e_score_correction_bias", (1, "E")),
        shared=Shared("shared_experts", "moe_intermediate_size", count="moe_num_shared_experts"),
        layers=_ernie_layers, check=_no_mlp_bias("use_bias"),
    ),
):  # fmt: skip
    register(_fam)


def _cohere_layers(c: Config) -> list[int]:
    """Cohere2-MoE: every layer whose ``mlp_layer_types`` entry is not ``"dense"``."""
    return [i for i, t in enumerate(field(c, "mlp_layer_types")) if t != "dense"]


def _cohere_check(c: Config) -> None:
    refuse(
        c,
        "expert_selection_fn",
        lambda v: v not in ("softmax", "sigmoid"),
        "moespec knows softmax and sigmoid",
    )
    if field(c, "num_shared_experts") > 0:
        refuse(
            c, "shared_expert_combination_strategy", lambda v: v != "sum",
            "'average' halves routed + shared output, which moespec does not express",
        )  # fmt: skip


def _cohere2() -> Family:
    """One adapter whose maths follows ``expert_selection_fn``."""
    common = {
        "width": "intermediate_size", "layers": _cohere_layers, "check": _cohere_check,
        "shared": Shared("shared_experts", "intermediate_size", count="num_shared_experts"),
    }  # fmt: skip
    soft = topk_family(
        "cohere2_moe", "Cohere2MoeSparseMoeBlock", order="topk_then_softmax", renorm=False, **common
    )
    sig = topk_family("cohere2_moe", "Cohere2MoeSparseMoeBlock", score="sigmoid", **common)

    def pick(c: Config) -> Family:
        return sig if field(c, "expert_selection_fn") == "sigmoid" else soft

    return by_config(pick, soft, sources={**soft.sources, "layer.router.score": "expert_selection_fn"})


_MISTRAL = {
    "experts": "num_local_experts", "scaling": "routed_scaling_factor", "groups": "top2_sum",
    "shared": Shared("shared_experts", "moe_intermediate_size", count="n_shared_experts", always=True),
}  # fmt: skip
for _fam in (
    topk_family("mistral4", "Mistral4MoE", layers=after_dense(), **_MISTRAL),
    topk_family("mistral_large4", "MistralLarge4TextMoE", renorm=True, layers=sparse_layer_types, **_MISTRAL),
    deepseek_v3_family("minicpm5_moe", "MiniCPM5MoeMoE", sparse_layer_types),
    topk_family(
        "mimo_v2_flash", "MiMoV2FlashMoE", experts="num_local_experts", score="sigmoid",
        scaling="routed_scaling_factor", bias=("gate.e_score_correction_bias", ("E",)), groups="top2_sum",
        layers=sparse_layer_types,
    ),
    _cohere2(),
):  # fmt: skip
    register(_fam)


def _hunyuan_check(c: Config) -> None:
    for name in ("num_experts", "moe_topk"):
        refuse(
            c, name, lambda v: not isinstance(v, int), "per-layer values; moespec.hf maps one layer design"
        )


_LAGUNA_SCALE = (
    "Laguna multiplies the routed output by moe_routed_scaling_factor; moespec multiplies the routing "
    "weights (the same output; moespec's recorded weights carry the factor)"
)


def _laguna_check(c: Config) -> None:
    refuse(c, "moe_router_logit_softcapping", lambda v: v > 0, "tanh soft-capping of the router logits")


_LFM2_EPS = (
    "LFM2-MoE renormalises with +1e-6 in the denominator; moespec adds none (a relative difference "
    "below 1e-6); its experts' SiLU is fixed in the code"
)


def _lfm2_layers(c: Config) -> list[int]:
    """LFM2-MoE, AFMoE: layers from ``num_dense_layers`` on are MoE."""
    return [i for i in range(field(c, "num_hidden_layers")) if i >= field(c, "num_dense_layers")]


def _lfm2() -> Family:
    """One adapter whose selection bias follows ``use_expert_bias``."""
    common = {
        "score": "sigmoid", "scaling": "routed_scaling_factor", "notes": (_LFM2_EPS,), "act": "silu",
        "layers": _lfm2_layers,
    }  # fmt: skip
    plain = topk_family("lfm2_moe", "Lfm2MoeSparseMoeBlock", **common)
    biased = topk_family("lfm2_moe", "Lfm2MoeSparseMoeBlock", bias=("expert_bias", ("E",)), **common)

    def pick(c: Config) -> Family:
        return biased if field(c, "use_expert_bias") else plain

    sources = {**biased.sources, "layer.router.expert_bias": "use_expert_bias, expert_bias (frozen)"}
    return by_config(pick, plain, sources=sources)


for _fam in (
    topk_family(
        "hunyuan_v1_moe", "HunYuanMoEV1Moe", router_key="gate.wg.weight", experts="num_local_experts",
        width="intermediate_size", renorm=True, shared=Shared("shared_mlp", "intermediate_size"),
        check=_hunyuan_check,
    ),
    topk_family(
        "laguna", "LagunaSparseMoeBlock", score="sigmoid", renorm=True, scaling="moe_routed_scaling_factor",
        bias=("gate.e_score_correction_bias", ("E",)), shared=Shared("shared_experts", _SHARED),
        layers=sparse_layer_types, check=_laguna_check, notes=(_LAGUNA_SCALE,),
    ),
    _lfm2(),
):  # fmt: skip
    register(_fam)


_OUTPUT_SCALE = (
    "the block multiplies the routed output by routed_scaling_factor; moespec multiplies the routing "
    "weights (the same output; moespec's recorded weights carry the factor)"
)
_GROUPED_V3 = {"score": "sigmoid", "bias": ("gate.e_score_correction_bias", ("E",)), "groups": "top2_sum"}
for _fam in (
    topk_family(
        "afmoe", "AfmoeSparseMoeBlock", router="router", router_key="router.gate.weight", score="sigmoid",
        renorm=True, scaling="route_scale", bias=("expert_bias", ("E",)),
        shared=Shared("shared_experts", "moe_intermediate_size", count="num_shared_experts", always=True),
        layers=_lfm2_layers,
    ),
    topk_family(
        "dots3_note", "Dots3NoteTextMoE", experts="num_local_experts", scaling="routed_scaling_factor",
        shared=Shared("shared_experts", "shared_experts_intermediate_size", "n_shared_experts", always=True),
        layers=sparse_layer_types, **_GROUPED_V3,
    ),
    topk_family(
        "beam", "BeamMoE", scaling="routed_scaling_factor", layers=sparse_layer_types, notes=(_OUTPUT_SCALE,),
        **_GROUPED_V3,
    ),
):  # fmt: skip
    register(_fam)
