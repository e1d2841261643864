"""Loud errors: layouts name the key (missing, extra, wrong shape, transposed), configs name
the field moespec cannot express, unsupported families name the family and why."""

from __future__ import annotations

import pytest
import torch

import moespec.hf
from moespec.errors import BuildError
from moespec.hf.layout import Layout, Rule
from tests.hf.conftest import eager, transformers


def mixtral(d: int = 16, f: int = 12, **kw: object) -> tuple[torch.nn.Module, object]:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = eager(
        transformers.MixtralConfig(
            hidden_size=d, intermediate_size=f, num_local_experts=4, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=4, **kw,
        )
    )  # fmt: skip
    return MixtralSparseMoeBlock(cfg), cfg


def test_missing_and_extra_keys_are_named() -> None:
    block, cfg = mixtral()
    layout = moespec.hf.FAMILIES["mixtral"].layout(cfg)
    sd = dict(block.state_dict())
    sd.pop("experts.down_proj")
    sd["experts.extra"] = torch.zeros(1)
    with pytest.raises(BuildError, match=r"(?s)missing: experts.down_proj.*unexpected: experts.extra"):
        layout.to_moespec(sd)


def test_wrong_shape_names_the_key_and_the_dims() -> None:
    block, cfg = mixtral()
    sd = dict(block.state_dict())
    sd["experts.down_proj"] = torch.zeros(4, 16, 13)
    with pytest.raises(BuildError, match=r"experts.down_proj: shape \[4, 16, 13\].*\[E=4, D=16, F=12\]"):
        moespec.hf.FAMILIES["mixtral"].layout(cfg).to_moespec(sd)


def test_a_transposed_tensor_is_called_out() -> None:
    block, cfg = mixtral()
    sd = dict(block.state_dict())
    sd["experts.down_proj"] = sd["experts.down_proj"].transpose(1, 2)
    with pytest.raises(BuildError, match=r"experts.down_proj: .*looks permuted \(0, 2, 1\)"):
        moespec.hf.FAMILIES["mixtral"].layout(cfg).to_moespec(sd)


def test_a_transposed_layout_with_equal_dims_is_refused() -> None:
    # D == F: a transposed down_proj has the declared shape; the experts' own flag tells.
    block, cfg = mixtral(d=16, f=16)
    block.experts.is_transposed = True
    with pytest.raises(BuildError, match=r"experts.gate_up_proj: .*is_transposed=True"):
        moespec.hf.from_block(block, cfg)


def test_moespec_side_shapes_are_checked_on_the_way_back() -> None:
    block, cfg = mixtral()
    layer = moespec.hf.from_block(block, cfg)
    sd = dict(layer.state_dict())
    sd["experts.0.w_up"] = sd["experts.0.w_up"][:, :-1]
    with pytest.raises(BuildError, match=r"experts.0.w_up: shape \[4, 11, 16\].*\[E=4, F=12, D=16\]"):
        moespec.hf.FAMILIES["mixtral"].layout(cfg).to_hf(sd)


def test_interleaved_and_permuted_rules_round_trip() -> None:
    # GPT-OSS style: gate_up [E, D, 2F] with gate and up interleaved on the last dim.
    rule = Rule(
        "gate_up",
        ("E", "D", "2*F"),
        ("g", "u"),
        ("E", "F", "D"),
        perm=(0, 2, 1),
        split_dim=1,
        interleaved=True,
    )
    layout = Layout((rule,), {"E": 3, "D": 5, "F": 4})
    t = torch.randn(3, 5, 8)
    ms = layout.to_moespec({"gate_up": t})
    assert torch.equal(ms["g"], t[..., ::2].transpose(1, 2))
    assert torch.equal(ms["u"], t[..., 1::2].transpose(1, 2))
    assert torch.equal(layout.to_hf(ms)["gate_up"], t)


def test_a_config_field_moespec_cannot_follow_is_named() -> None:
    _, cfg = mixtral(router_jitter_noise=0.1)
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"router_jitter_noise = 0.1"):
        moespec.hf.spec_from_config(cfg)
    _, cfg = mixtral(hidden_act="gelu_new")
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"hidden_act = 'gelu_new'"):
        moespec.hf.spec_from_config(cfg)


def test_unsupported_family_is_named_with_its_reason() -> None:
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    cfg = transformers.PhimoeConfig(
        hidden_size=16, intermediate_size=8, num_local_experts=4, num_attention_heads=4
    )
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"'phimoe'.*SparseMixer"):
        moespec.hf.from_block(PhimoeSparseMoeBlock(cfg), cfg)
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"'phimoe'"):
        moespec.hf.spec_from_config(cfg)


def test_not_a_block() -> None:
    block, cfg = mixtral()
    with pytest.raises(
        BuildError, match=r"MixtralExperts is not an MoE block of transformers family 'mixtral'"
    ):
        moespec.hf.from_block(block.experts, cfg)
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"not from transformers.models"):
        moespec.hf.from_block(torch.nn.Linear(2, 2))


def test_config_may_be_omitted_where_the_block_carries_it() -> None:
    block, _ = mixtral()
    layer = moespec.hf.from_block(block)  # transformers' experts module keeps the config
    assert layer.ir.experts.n_experts == 4
    moespec.hf.to_block(layer, block)


def test_to_block_refuses_a_block_of_another_family() -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block, cfg = mixtral()
    layer = moespec.hf.from_block(block, cfg)
    qcfg = transformers.Qwen3MoeConfig(
        hidden_size=16, num_attention_heads=4, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2
    )
    with pytest.raises(BuildError, match=r"the moespec layer's router differ.*not built for this block"):
        moespec.hf.to_block(layer, Qwen3MoeSparseMoeBlock(eager(qcfg)), qcfg)
