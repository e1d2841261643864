"""Adapters for families whose MoE block, router and experts are, read line by line in
transformers 5.25, the same code as a family of :mod:`moespec.hf.families_core` (only the
class names, the config fields read and which decoder layers are MoE differ):

- Mixtral's block and router: MiniMax.
- Qwen3-MoE's block, router with ``norm_topk_prob``: Mellum, Qwen3-Omni-MoE's thinker (its
  talker's MoE block differs and is not adapted: ``patch`` names it), (OLMoE's block) FlexOlmo;
  renormalising always: Qwen3-VL-MoE.
- Qwen2-MoE's block with the sigmoid-gated shared expert: Qwen3-Next, Qwen4-Exp
  (``norm_topk_prob``), Qwen3.5-MoE (always renormalised).
- GraniteMoE (and its SWA, hybrid and shared variants, whose shared MLP sits outside the
  block): top-k of the logits, then softmax over the k; router under ``router``.
- Jamba: softmax top-k, never renormalised; router under ``router``.
- DeepSeek-V3's block and router: DeepSeek-V3.2, GLM-4-MoE (and -Lite, 4V-MoE text, MoE-DSA),
  Solar-Open, dots1, Kimi-Linear.
- DeepSeek-V2's block and router: DeepSeek-OCR-2 and Unlimited-OCR (their text decoders).
"""

from __future__ import annotations

from moespec.hf.common import after_dense, all_layers, field, sparse_step_layers
from moespec.hf.families_core import (
    deepseek_v2_family,
    deepseek_v3_family,
    mixtral_check,
    softmax_family,
    sparse_layer_types,
)
from moespec.hf.registry import Config, register


def _jamba_layers(c: Config) -> list[int]:
    """Jamba's decoder layer i is MoE when ``layers_num_experts[i] > 1``."""
    return [i for i, n in enumerate(field(c, "layers_num_experts")) if n > 1]


_GRANITE = {"router": "router", "experts": "num_local_experts", "width": "intermediate_size", "renorm": False}

for _fam in (
    softmax_family(
        "minimax", "MiniMaxSparseMoeBlock", experts="num_local_experts", width="intermediate_size",
        renorm=True, check=mixtral_check,
    ),
    softmax_family("mellum", "MellumSparseMoeBlock", layers=sparse_layer_types),
    softmax_family(
        "qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock", layers=sparse_step_layers,
        notes=("only the thinker's MoE blocks are adapted; patch refuses a model holding the talker's",),
    ),
    softmax_family("flex_olmo", "FlexOlmoSparseMoeBlock", width="intermediate_size"),
    softmax_family("qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", renorm=True, layers=sparse_step_layers),
    softmax_family("qwen3_next", "Qwen3NextSparseMoeBlock", qwen_shared=True, layers=sparse_step_layers),
    softmax_family("qwen4_exp", "Qwen4ExpTextSparseMoeBlock", qwen_shared=True),
    softmax_family("qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", renorm=True, qwen_shared=True),
    softmax_family("granitemoe", "GraniteMoeMoE", order="topk_then_softmax", **_GRANITE),
    softmax_family("granitemoe_swa", "GraniteMoeSWAMoE", order="topk_then_softmax", **_GRANITE),
    softmax_family("granitemoehybrid", "GraniteMoeHybridMoE", order="topk_then_softmax", **_GRANITE),
    softmax_family("granitemoeshared", "GraniteMoeSharedMoE", order="topk_then_softmax", **_GRANITE),
    softmax_family(
        "jamba", "JambaSparseMoeBlock", router="router", width="intermediate_size", renorm=False,
        layers=_jamba_layers,
    ),
    deepseek_v3_family("deepseek_v32", "DeepseekV32MoE", sparse_layer_types),
    deepseek_v3_family("glm4_moe", "Glm4MoeMoE", after_dense()),
    deepseek_v3_family("glm4_moe_lite", "Glm4MoeLiteMoE", sparse_layer_types),
    deepseek_v3_family("glm4v_moe", "Glm4vMoeTextMoE", after_dense()),
    deepseek_v3_family("glm_moe_dsa", "GlmMoeDsaMoE", sparse_layer_types),
    deepseek_v3_family("solar_open", "SolarOpenMoE", all_layers),
    deepseek_v3_family("dots1", "Dots1MoE", after_dense()),
    deepseek_v3_family("kimi_linear", "KimiLinearMoE", sparse_layer_types),
    deepseek_v2_family("deepseek_ocr2", "DeepseekOcr2TextMoe", sparse_layer_types),
    deepseek_v2_family("unlimited_ocr", "UnlimitedOcrTextMoe", sparse_layer_types),
):  # fmt: skip
    register(_fam)
