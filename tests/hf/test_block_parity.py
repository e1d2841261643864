"""Every supported family: the moespec layer ``from_block`` makes equals the transformers block
(output, router logits, chosen experts and their weights, the input's and every weight's
gradient; atol 1e-5 on unit-scale weights, fp32), and ``to_block`` writes the weights back
exactly."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import moespec
import moespec.hf
from moespec.hf.registry import FAMILIES
from tests.hf.conftest import (
    ATOL,
    RTOL,
    block_class,
    by_expert,
    eager,
    randomize,
    router_output,
    transformers,
)

D = 40
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 4}  # the configs' validators check D


def _mixtral() -> Any:
    return transformers.MixtralConfig(
        hidden_size=D, **HEADS, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2
    )


def _qwen2(norm: bool) -> Callable[[], Any]:
    return lambda: transformers.Qwen2MoeConfig(
        hidden_size=D,
        **HEADS,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=28,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=norm,
    )


def _qwen3(norm: bool) -> Callable[[], Any]:
    return lambda: transformers.Qwen3MoeConfig(
        hidden_size=D,
        **HEADS,
        moe_intermediate_size=20,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=norm,
    )


def _olmoe() -> Any:
    return transformers.OlmoeConfig(
        hidden_size=D, **HEADS, intermediate_size=18, num_experts=8, num_experts_per_tok=2
    )


def _deepseek_v2(method: str) -> Callable[[], Any]:
    return lambda: transformers.DeepseekV2Config(
        hidden_size=D,
        **HEADS,
        moe_intermediate_size=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        topk_method=method,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    )


def _deepseek_v3(norm: bool) -> Callable[[], Any]:
    return lambda: transformers.DeepseekV3Config(
        hidden_size=D,
        **HEADS,
        moe_intermediate_size=12,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm,
    )


def _cfg(module: str, cls: str, **kw: Any) -> Callable[[], Any]:
    """A tiny config of ``transformers.models.<module>``'s ``cls``."""

    def make() -> Any:
        mod = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
        return getattr(mod, cls)(hidden_size=D, **HEADS, **kw)

    return make


QWEN = {"moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 3}
SHARED = {**QWEN, "shared_expert_intermediate_size": 20}
GRANITE = {"intermediate_size": 16, "num_local_experts": 6, "num_experts_per_tok": 2}
V3 = {
    "moe_intermediate_size": 12, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 1,
    "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.7, "norm_topk_prob": True,
}  # fmt: skip
V2 = {
    "moe_intermediate_size": 12, "n_routed_experts": 8, "num_experts_per_tok": 3, "n_shared_experts": 1,
    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.3,
}  # fmt: skip


def _dbrx() -> Any:
    ffn = {"ffn_hidden_size": 12, "moe_num_experts": 8, "moe_top_k": 3}
    return transformers.DbrxConfig(d_model=D, n_heads=4, ffn_config=ffn)


COHERE = {
    "intermediate_size": 12, "num_experts": 8, "num_experts_per_tok": 3, "num_shared_experts": 2,
    "shared_expert_combination_strategy": "sum",
}  # fmt: skip

INKLING = {
    "moe_intermediate_size": 12, "n_routed_experts": 8, "num_experts_per_tok": 3,
    "routed_scaling_factor": 1.5, "mlp_gate_softcap": 0.8, "mlp_up_softcap": 1.5,
}  # fmt: skip

CASES: dict[str, tuple[str, Callable[[], Any]]] = {
    "mixtral": ("mixtral", _mixtral),
    "qwen2_moe-norm": ("qwen2_moe", _qwen2(True)),
    "qwen2_moe-raw": ("qwen2_moe", _qwen2(False)),
    "qwen3_moe-norm": ("qwen3_moe", _qwen3(True)),
    "qwen3_moe-raw": ("qwen3_moe", _qwen3(False)),
    "olmoe": ("olmoe", _olmoe),
    "deepseek_v2-greedy": ("deepseek_v2", _deepseek_v2("greedy")),
    "deepseek_v2-group": ("deepseek_v2", _deepseek_v2("group_limited_greedy")),
    "deepseek_v3-norm": ("deepseek_v3", _deepseek_v3(True)),
    "deepseek_v3-raw": ("deepseek_v3", _deepseek_v3(False)),
    # No shared experts: transformers still builds a width-0 shared MLP, checked and dropped.
    "deepseek_v3-noshared": (
        "deepseek_v3",
        _cfg("deepseek_v3", "DeepseekV3Config", **{**V3, "n_shared_experts": 0}),
    ),
    "mistral4-noshared": ("mistral4", _cfg("mistral4", "Mistral4Config", **{**V3, "n_shared_experts": 0})),
    "minimax": (
        "minimax",
        _cfg("minimax", "MiniMaxConfig", intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    ),
    "mellum": ("mellum", _cfg("mellum", "MellumConfig", **QWEN, norm_topk_prob=False)),
    "flex_olmo": (
        "flex_olmo",
        _cfg(
            "flex_olmo",
            "FlexOlmoConfig",
            intermediate_size=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "qwen3_vl_moe": ("qwen3_vl_moe", _cfg("qwen3_vl_moe", "Qwen3VLMoeTextConfig", **QWEN)),
    "qwen3_next": ("qwen3_next", _cfg("qwen3_next", "Qwen3NextConfig", **SHARED, norm_topk_prob=True)),
    "qwen4_exp": ("qwen4_exp", _cfg("qwen4_exp", "Qwen4ExpTextConfig", **SHARED, norm_topk_prob=False)),
    "qwen3_5_moe": ("qwen3_5_moe", _cfg("qwen3_5_moe", "Qwen3_5MoeTextConfig", **SHARED)),
    "granitemoe": ("granitemoe", _cfg("granitemoe", "GraniteMoeConfig", **GRANITE)),
    "granitemoe_swa": ("granitemoe_swa", _cfg("granitemoe_swa", "GraniteMoeSWAConfig", **GRANITE)),
    "granitemoehybrid": (
        "granitemoehybrid",
        _cfg("granitemoehybrid", "GraniteMoeHybridConfig", **GRANITE, mamba_n_heads=4),
    ),
    "granitemoeshared": ("granitemoeshared", _cfg("granitemoeshared", "GraniteMoeSharedConfig", **GRANITE)),
    "jamba": (
        "jamba",
        _cfg("jamba", "JambaConfig", intermediate_size=16, num_experts=6, num_experts_per_tok=2),
    ),
    "deepseek_v32": ("deepseek_v32", _cfg("deepseek_v32", "DeepseekV32Config", **V3)),
    "glm4_moe": ("glm4_moe", _cfg("glm4_moe", "Glm4MoeConfig", **V3)),
    "glm4_moe_lite": ("glm4_moe_lite", _cfg("glm4_moe_lite", "Glm4MoeLiteConfig", **V3)),
    "glm4v_moe": ("glm4v_moe", _cfg("glm4v_moe", "Glm4vMoeTextConfig", **V3)),
    "glm_moe_dsa": ("glm_moe_dsa", _cfg("glm_moe_dsa", "GlmMoeDsaConfig", **V3)),
    "solar_open": ("solar_open", _cfg("solar_open", "SolarOpenConfig", **V3)),
    "dots1": ("dots1", _cfg("dots1", "Dots1Config", **V3)),
    "kimi_linear": ("kimi_linear", _cfg("kimi_linear", "KimiLinearConfig", **V3)),
    "deepseek_ocr2": ("deepseek_ocr2", _cfg("deepseek_ocr2", "DeepseekOcr2TextConfig", **V2)),
    "flint": ("flint", _cfg("flint", "FlintConfig", **SHARED, norm_topk_prob=True)),
    "lara_mini": ("lara_mini", _cfg("lara_mini", "LaraMiniConfig", **SHARED, norm_topk_prob=False)),
    "minimax_m2": ("minimax_m2", _cfg("minimax_m2", "MiniMaxM2Config", **GRANITE)),
    "hy_v3": (
        "hy_v3",
        _cfg(
            "hy_v3",
            "HYV3Config",
            moe_intermediate_size=12,
            num_local_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=2,
            router_scaling_factor=1.9,
        ),
    ),
    "exaone_moe": (
        "exaone_moe",
        _cfg(
            "exaone_moe",
            "ExaoneMoeConfig",
            moe_intermediate_size=12,
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.1,
            norm_topk_prob=True,
        ),
    ),
    "ernie4_5_moe": (
        "ernie4_5_moe",
        _cfg(
            "ernie4_5_moe",
            "Ernie4_5_MoeConfig",
            moe_intermediate_size=12,
            num_experts=8,
            num_experts_per_tok=3,
            moe_num_shared_experts=2,
        ),
    ),
    "mistral4": (
        "mistral4",
        _cfg("mistral4", "Mistral4Config", **V3),
    ),
    "mistral_large4": ("mistral_large4", _cfg("mistral_large4", "MistralLarge4TextConfig", **V3)),
    "minicpm5_moe": ("minicpm5_moe", _cfg("minicpm5_moe", "MiniCPM5MoeConfig", **V3)),
    "mimo_v2_flash": ("mimo_v2_flash", _cfg("mimo_v2_flash", "MiMoV2FlashConfig", **V3)),
    "cohere2_moe-softmax": (
        "cohere2_moe",
        _cfg("cohere2_moe", "Cohere2MoeConfig", **COHERE, expert_selection_fn="softmax"),
    ),
    "cohere2_moe-sigmoid": (
        "cohere2_moe",
        _cfg("cohere2_moe", "Cohere2MoeConfig", **COHERE, expert_selection_fn="sigmoid", norm_topk_prob=True),
    ),
    "hunyuan_v1_moe": (
        "hunyuan_v1_moe",
        _cfg("hunyuan_v1_moe", "HunYuanMoEV1Config", intermediate_size=12, num_experts=8, moe_topk=3),
    ),
    "laguna": ("laguna", _cfg("laguna", "LagunaConfig", **SHARED, moe_routed_scaling_factor=1.6)),
    "lfm2_moe-bias": (
        "lfm2_moe",
        _cfg(
            "lfm2_moe",
            "Lfm2MoeConfig",
            **QWEN,
            use_expert_bias=True,
            routed_scaling_factor=1.4,
            norm_topk_prob=True,
        ),
    ),
    "lfm2_moe-plain": (
        "lfm2_moe",
        _cfg(
            "lfm2_moe",
            "Lfm2MoeConfig",
            **QWEN,
            use_expert_bias=False,
            routed_scaling_factor=1.4,
            norm_topk_prob=False,
        ),
    ),
    "afmoe": (
        "afmoe",
        _cfg(
            "afmoe",
            "AfmoeConfig",
            moe_intermediate_size=12,
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=2,
            route_scale=1.8,
        ),
    ),
    "dots3_note": (
        "dots3_note",
        _cfg(
            "dots3_note",
            "Dots3NoteTextConfig",
            **{**V3, "n_routed_experts": 8},
            shared_experts_intermediate_size=10,
        ),
    ),
    "beam": (
        "beam",
        _cfg(
            "beam",
            "BeamConfig",
            moe_intermediate_size=12,
            num_experts=8,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.2,
            norm_topk_prob=True,
        ),
    ),
    "axk2-grouped": ("axk2", _cfg("axk2", "AXK2Config", **V3)),
    "axk2-plain": ("axk2", _cfg("axk2", "AXK2Config", **{**V3, "n_group": None, "topk_group": None})),
    "longcat_flash": (
        "longcat_flash",
        _cfg(
            "longcat_flash",
            "LongcatFlashConfig",
            expert_ffn_hidden_size=12,
            n_routed_experts=6,
            zero_expert_num=3,
            moe_topk=3,
            routed_scaling_factor=1.5,
        ),
    ),
    "qwen3_omni_moe": (
        "qwen3_omni_moe",
        _cfg("qwen3_omni_moe", "Qwen3OmniMoeTextConfig", **QWEN, norm_topk_prob=True),
    ),
    "aria": (
        "aria",
        _cfg(
            "aria",
            "AriaTextConfig",
            intermediate_size=12,
            moe_num_experts=8,
            moe_topk=3,
            moe_num_shared_experts=2,
        ),
    ),
    "dbrx": ("dbrx", _dbrx),
    "unlimited_ocr": ("unlimited_ocr", _cfg("unlimited_ocr", "UnlimitedOcrTextConfig", **V2)),
    # The clamped SwiGLU: a limit below the unit-scale pre-activations, so the clamps bite.
    "gpt_oss": (
        "gpt_oss",
        _cfg(
            "gpt_oss",
            "GptOssConfig",
            intermediate_size=12,
            num_local_experts=8,
            num_experts_per_tok=3,
            swiglu_limit=0.7,
        ),
    ),
    "glm5_next": ("glm5_next", _cfg("glm5_next", "Glm5NextTextConfig", **V3, swiglu_limit=0.7)),
    "hy_v4": ("hy_v4", _cfg("hy_v4", "HYV4Config", **V3, swiglu_limit=0.7)),
    "hy_v4_vl": ("hy_v4_vl", _cfg("hy_v4_vl", "HYV4VLTextConfig", **V3, swiglu_limit=0.7)),
    # Softcaps below the unit-scale pre-activations, so they bend.
    "inkling2": (
        "inkling2",
        _cfg("inkling2", "Inkling2TextConfig", **INKLING),
    ),
    "inkling2_loop": (
        "inkling2_loop",
        _cfg("inkling2_loop", "Inkling2LoopTextConfig", **INKLING),
    ),
    "minimax_m3_vl": (
        "minimax_m3_vl",
        _cfg(
            "minimax_m3_vl",
            "MiniMaxM3VLTextConfig",
            intermediate_size=12,
            shared_intermediate_size=10,
            num_local_experts=8,
            num_experts_per_tok=3,
            routed_scaling_factor=1.5,
            swiglu_limit=0.7,
        ),
    ),
    "openai_privacy_filter": (
        "openai_privacy_filter",
        _cfg(
            "openai_privacy_filter",
            "OpenAIPrivacyFilterConfig",
            intermediate_size=12,
            num_local_experts=8,
            num_experts_per_tok=3,
            swiglu_limit=0.7,
        ),
    ),
}


# Families whose block multiplies the routed output by a config field the router's weights lack.
OUTPUT_SCALE = {
    "laguna": "moe_routed_scaling_factor",
    "beam": "routed_scaling_factor",
    "openai_privacy_filter": "num_experts_per_tok",  # its router divides by k, its block multiplies
    "minimax_m3_vl": "routed_scaling_factor",
}


# A.X-K2 masks dropped groups with 0.0 (documented): parity holds where biased scores are positive.
POSITIVE_BIAS = {"axk2"}


def make_block(case: str, seed: int = 0) -> tuple[nn.Module, Any]:
    family, factory = CASES[case]
    config = eager(factory())
    block = block_class(family)(config).float()
    randomize(block, seed)
    if family in POSITIVE_BIAS:
        with torch.no_grad():
            block.gate.e_score_correction_bias.abs_()
    return block, config


def test_every_supported_family_has_a_case() -> None:
    assert {fam for fam, _ in CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_equals_block(case: str) -> None:
    block, config = make_block(case)
    layer = moespec.hf.from_block(block, config)
    block.train()
    layer.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, D, generator=gen)
    probe_y = torch.randn(2, 7, D, generator=gen)

    x_hf, x_ms = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf, (logits_hf, w_hf, idx_hf) = router_output(block, x_hf)
    with moespec.record_routing(layer, weights=True) as rec:
        y_ms = layer(x_ms)
    torch.testing.assert_close(y_ms, y_hf, atol=ATOL, rtol=RTOL)
    logits_ms = layer.router_logits
    torch.testing.assert_close(logits_ms, logits_hf.float(), atol=ATOL, rtol=RTOL)
    idx_ms, w_ms = by_expert(rec.experts[""][0], rec.weights[""][0])
    idx_hf, w_hf = by_expert(idx_hf, w_hf)
    # Laguna scales the routed output, not the weights its router returns; moespec's weights carry it.
    w_hf = w_hf * getattr(config, OUTPUT_SCALE.get(CASES[case][0], ""), 1.0)
    assert torch.equal(idx_ms, idx_hf), "different experts chosen"
    torch.testing.assert_close(w_ms, w_hf.float(), atol=ATOL, rtol=RTOL)

    probe_l = torch.randn(logits_hf.shape, generator=gen)
    ((y_hf * probe_y).sum() + (logits_hf * probe_l).sum()).backward()
    ((y_ms * probe_y).sum() + (logits_ms * probe_l).sum()).backward()
    torch.testing.assert_close(x_ms.grad, x_hf.grad, atol=ATOL, rtol=RTOL)
    # Every weight's gradient, moved into the block's layout by the same converter.
    grads = {
        k: (p.grad if isinstance(p, nn.Parameter) else torch.zeros_like(p))
        for k, p in layer.state_dict(keep_vars=True).items()
    }
    assert all(g is not None for g in grads.values()), "a weight got no gradient"
    family = FAMILIES[CASES[case][0]]
    hf_grads = family.layout(config).to_hf(grads)
    params = {
        k: p for k, p in block.named_parameters() if p.requires_grad
    }  # ERNIE's frozen bias is a Parameter
    assert set(hf_grads) >= set(params)
    for k, p in params.items():
        torch.testing.assert_close(hf_grads[k], p.grad, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact(case: str) -> None:
    block, config = make_block(case, seed=3)
    layer = moespec.hf.from_block(block, config)
    other = copy.deepcopy(block)
    randomize(other, seed=4)
    moespec.hf.to_block(layer, other, config)
    want, got = block.state_dict(), other.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    again = moespec.hf.from_block(other, config)
    for k, t in layer.state_dict().items():
        assert torch.equal(t, again.state_dict()[k]), k
