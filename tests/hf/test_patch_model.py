"""Whole tiny transformers models, patched: every MoE block replaced, and the model's contract
kept: logits and loss (with ``output_router_logits``, so the load-balancing loss reads the
recorded router logits) equal the unpatched model's, ``generate`` gives the same tokens, the
gradients agree, and ``save_pretrained`` writes a checkpoint the unpatched model loads."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moespec.hf
from moespec.errors import BuildError
from moespec.hf import PatchedBlock
from moespec.hf.registry import FAMILIES
from tests.hf.conftest import ATOL, RTOL, eager, randomize, transformers

SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "vocab_size": 97,
    "max_position_embeddings": 64,
    "output_router_logits": True,
}

MODELS: dict[str, Callable[[], Any]] = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        eager(
            transformers.MixtralConfig(
                **SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
            )
        )
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        eager(
            transformers.Qwen3MoeConfig(
                **SMALL,
                head_dim=8,
                moe_intermediate_size=16,
                num_experts=6,
                num_experts_per_tok=2,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
            )
        )
    ),
    "olmoe": lambda: transformers.OlmoeForCausalLM(
        eager(transformers.OlmoeConfig(**SMALL, intermediate_size=16, num_experts=6, num_experts_per_tok=2))
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        eager(
            transformers.Qwen2MoeConfig(
                **SMALL,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
            )
        )
    ),
    "granitemoe": lambda: transformers.GraniteMoeForCausalLM(
        eager(
            transformers.GraniteMoeConfig(
                **SMALL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2
            )
        )
    ),
    "dbrx": lambda: transformers.DbrxForCausalLM(
        eager(
            transformers.DbrxConfig(
                d_model=32,
                n_heads=4,
                n_layers=2,
                vocab_size=97,
                max_seq_len=64,
                output_router_logits=True,
                attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
            )
        )
    ),
    "ernie4_5_moe": lambda: transformers.Ernie4_5_MoeForCausalLM(
        eager(
            transformers.Ernie4_5_MoeConfig(
                **SMALL,
                moe_intermediate_size=12,
                num_experts=6,
                num_experts_per_tok=2,
                moe_num_shared_experts=1,
                moe_layer_start_index=1,
            )
        )
    ),
    "hunyuan_v1_moe": lambda: transformers.HunYuanMoEV1ForCausalLM(
        eager(
            transformers.HunYuanMoEV1Config(
                **SMALL, head_dim=8, intermediate_size=12, num_experts=6, moe_topk=2
            )
        )
    ),
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(
        eager(
            transformers.Glm4MoeConfig(
                **SMALL,
                intermediate_size=40,
                moe_intermediate_size=12,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
            )
        )
    ),
    "gpt_oss": lambda: transformers.GptOssForCausalLM(
        eager(
            transformers.GptOssConfig(
                **SMALL,
                head_dim=8,
                intermediate_size=16,
                num_local_experts=4,
                num_experts_per_tok=2,
                swiglu_limit=1.0,
            )
        )
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(
        eager(
            transformers.DeepseekV3Config(
                **{**SMALL, "num_key_value_heads": 4},
                intermediate_size=40,
                moe_intermediate_size=12,
                n_routed_experts=8,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
                kv_lora_rank=8,
                q_lora_rank=8,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
            )
        )
    ),
}


def make(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[family]().float().eval()
    for i, (_, m) in enumerate(
        (n, m) for n, m in model.named_modules() if type(m).__name__ in FAMILIES[family].blocks
    ):
        randomize(m, seed=10 + i)  # unit-scale MoE weights: a 0.02 init would hide wrong maths
    return model


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", sorted(MODELS))
def test_patched_model_keeps_the_contract(family: str, tmp_path: Path) -> None:
    model = make(family)
    ref = copy.deepcopy(model)
    report = moespec.hf.patch(model)
    n_moe = len(FAMILIES[family].moe_layers(model.config))
    assert len(report.replaced) == n_moe and n_moe > 0
    assert sum(isinstance(m, PatchedBlock) for m in model.modules()) == n_moe
    assert all(r.family == family and r.spec["layer"]["router"]["kind"] == "topk" for r in report.replaced)
    assert str(report).startswith(f"moespec.hf.patch: {n_moe} MoE block(s) replaced")

    tok = ids(model.config.vocab_size)
    out_ref = ref(tok, labels=tok, output_router_logits=True)
    out = model(tok, labels=tok, output_router_logits=True)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=ATOL, rtol=RTOL)
    assert len(out.router_logits) == len(out_ref.router_logits) == n_moe
    for ours, theirs in zip(out.router_logits, out_ref.router_logits, strict=True):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=ATOL, rtol=RTOL)
    if getattr(out_ref, "aux_loss", None) is not None:
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss, atol=ATOL, rtol=RTOL)

    # Gradients of the loss reach every weight, equal to the unpatched model's (compared in
    # the block's layout, which the patched model's state_dict speaks).
    out.loss.backward()
    out_ref.loss.backward()
    want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    got = _grads_in_hf_layout(model)
    assert set(want) <= set(got)
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")

    gen_ref = ref.generate(tok[:1, :4], max_new_tokens=6, do_sample=False)
    gen = model.generate(tok[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_ref)

    # save_pretrained writes the block's layout: the unpatched class loads it unchanged.
    assert set(model.state_dict()) == set(ref.state_dict())
    model.save_pretrained(tmp_path)
    back = type(ref).from_pretrained(tmp_path).float().eval()
    torch.testing.assert_close(back(tok).logits, ref(tok).logits, atol=ATOL, rtol=RTOL)
    # ... and a patched model loads the unpatched model's state_dict back into its moespec layers.
    moespec.hf.patch(back)
    back.load_state_dict(ref.state_dict())
    torch.testing.assert_close(back(tok).logits, ref(tok).logits, atol=ATOL, rtol=RTOL)


def _grads_in_hf_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The patched model's gradients under the unpatched model's keys."""
    out = {k: p.grad for k, p in model.named_parameters() if p.grad is not None and ".moe." not in k}
    for name, m in model.named_modules():
        if isinstance(m, PatchedBlock):
            grads = {
                k: (p.grad if isinstance(p, nn.Parameter) else torch.zeros_like(p))
                for k, p in m.moe.state_dict(keep_vars=True).items()
            }
            for k, g in m._layout.to_hf(grads).items():
                out[f"{name}.{k}"] = g
    return out


def test_patch_refuses_an_unsupported_family_untouched() -> None:
    cfg = transformers.PhimoeConfig(
        **{**SMALL, "num_hidden_layers": 1}, intermediate_size=16, num_local_experts=4
    )
    model = transformers.PhimoeForCausalLM(eager(cfg))
    with pytest.raises(moespec.hf.UnsupportedFamilyError, match=r"'phimoe'.*SparseMixer"):
        moespec.hf.patch(model)
    assert not any(isinstance(m, PatchedBlock) for m in model.modules())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_twenty_training_steps_stay_together(family: str) -> None:
    """The same 20 AdamW steps from the same weights: the patched model's losses follow the
    unpatched model's (the load-balancing loss included, through the recorded router logits)."""
    model = make(family).train()
    ref = copy.deepcopy(model)
    moespec.hf.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(7)
    for step in range(20):
        tok = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
        losses = []
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            loss = m(tok, labels=tok, output_router_logits=True).loss
            loss.backward()
            o.step()
            losses.append(loss.detach())
        torch.testing.assert_close(
            losses[0], losses[1], atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}"
        )


def test_patch_refuses_an_unadapted_block_of_a_supported_family() -> None:
    """A module that looks like MoE (here stray Mixtral experts outside a block) is never
    skipped silently: patch names it and leaves everything in place."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralSparseMoeBlock

    cfg = eager(transformers.MixtralConfig(**SMALL, intermediate_size=8, num_local_experts=4))
    model = nn.ModuleDict({"moe": MixtralSparseMoeBlock(cfg), "stray": MixtralExperts(cfg)})
    with pytest.raises(
        moespec.hf.UnsupportedFamilyError, match=r"stray: MixtralExperts of transformers family 'mixtral'"
    ):
        moespec.hf.patch(model)
    assert isinstance(model["moe"], MixtralSparseMoeBlock)


def test_report_lists_modules_specs_and_differences() -> None:
    model = make("deepseek_v3")
    report = moespec.hf.patch(model)
    names = [r.name for r in report.replaced]
    assert names == ["model.layers.1.mlp", "model.layers.2.mlp"]  # layer 0 is dense (first_k_dense_replace)
    rep = report.replaced[0]
    assert rep.block_class == "DeepseekV3MoE" and rep.spec["layer"]["router"]["score"] == "sigmoid"
    assert any("frozen" in n for n in rep.notes)
    text = str(report)
    assert "model.layers.1.mlp: DeepseekV3MoE (deepseek_v3)" in text and "note: transformers keeps" in text
    with pytest.raises(BuildError, match="holds no transformers MoE block"):
        moespec.hf.patch(model)  # already patched


def test_frozen_weights_stay_frozen() -> None:
    """Experts frozen before patching (say for fine-tuning the rest) stay frozen after."""
    model = make("mixtral")
    for name, p in model.named_parameters():
        if ".experts." in name:
            p.requires_grad_(False)
    moespec.hf.patch(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".moe.experts." in n for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".moe.router." in n)
    tok = ids(model.config.vocab_size)
    model(tok, labels=tok).loss.backward()
    assert all(model.get_parameter(n).grad is None for n in frozen)


def test_gradient_checkpointing() -> None:
    """transformers' gradient checkpointing reruns the patched blocks in backward: same
    loss and gradients as the unpatched model."""
    model = make("mixtral").train()
    ref = copy.deepcopy(model)
    moespec.hf.patch(model)
    tok = ids(model.config.vocab_size)
    losses = []
    for m in (model, ref):
        m.gradient_checkpointing_enable()
        loss = m(tok, labels=tok, output_router_logits=True).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=ATOL, rtol=RTOL)
    got = _grads_in_hf_layout(model)
    for k, p in ref.named_parameters():
        torch.testing.assert_close(got[k], p.grad, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")


def test_router_logits_hooks_installed_before_patching_move_to_the_tap() -> None:
    """A model that already ran has transformers' output-recording hooks on its old routers;
    after patch they fire on the taps, so router logits are still recorded."""
    model = make("qwen3_moe")
    tok = ids(model.config.vocab_size)
    before = model(tok, output_router_logits=True).router_logits
    moespec.hf.patch(model)
    after = model(tok, output_router_logits=True).router_logits
    assert len(after) == len(before) == 2
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
