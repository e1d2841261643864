"""Whole networks against transformers' models: specs/mixtral-8x7b.yaml, qwen3-30b-a3b.yaml
and olmoe-1b-7b.yaml shrunk by overrides, against MixtralForCausalLM, Qwen3MoeForCausalLM and
OlmoeForCausalLM on tiny random configs (fp32, nothing downloaded). The HF weights are copied
by hand (``strict=True``):

    model.embed_tokens / model.norm / lm_head        -> embed_tokens / norm / lm_head
    model.layers.i.self_attn.{q,k,v,o}_proj, q_norm, k_norm -> blocks.i.attn.<same>
    model.layers.i.input_layernorm / post_attention_layernorm -> blocks.i.attn_norm / ffn_norm
    model.layers.i.mlp.gate.weight                    -> blocks.i.ffn.router.weight
    model.layers.i.mlp.experts.gate_up_proj [E, 2F, D] -> blocks.i.ffn.experts.0.w_gate, w_up
    model.layers.i.mlp.experts.down_proj [E, D, F]    -> blocks.i.ffn.experts.0.w_down

Logits and the next-token cross-entropy must agree to 1e-5 on unit-scale weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

import moespec  # noqa: E402

SPECS = Path(__file__).resolve().parents[2] / "specs"
D, F, E, K, V, BLOCKS, HEADS, KV = 16, 8, 4, 2, 50, 2, 4, 2


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _to_moespec(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in hf.items():
        k = key.removeprefix("model.")
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            b = f"blocks.{i}"
            if rest == "mlp.experts.gate_up_proj":
                out[f"{b}.ffn.experts.0.w_gate"], out[f"{b}.ffn.experts.0.w_up"] = value[:, :F], value[:, F:]
                continue
            rest = {
                "input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "ffn_norm.weight",
                "mlp.gate.weight": "ffn.router.weight",
                "mlp.experts.down_proj": "ffn.experts.0.w_down",
            }.get(rest, rest.replace("self_attn.", "attn."))
            out[f"{b}.{rest}"] = value
        else:
            out[k] = value
    return {k: v.clone() for k, v in out.items()}


CASES = {
    "mixtral-8x7b": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=E, router_jitter_noise=0.0),
    ),
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=E, moe_intermediate_size=F, head_dim=8, norm_topk_prob=True),
    ),
    "olmoe-1b-7b": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=E, norm_topk_prob=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_transformers(name: str):
    cfg_name, model_name, extra = CASES[name]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
        num_key_value_heads=KV, num_experts_per_tok=K, max_position_embeddings=32, pad_token_id=None,
        eos_token_id=None, bos_token_id=None, **extra,
    )  # fmt: skip
    cfg._experts_implementation = "eager"
    cfg._attn_implementation = "eager"
    hf = getattr(transformers, model_name)(cfg).float().eval()
    _randomize(hf)
    head_dim = extra.get("head_dim", D // HEADS)
    overrides = [
        f"d_model={D}", f"layer.experts.routed.0.d_ff={F}", f"layer.experts.routed.0.count={E}",
        f"layer.router.k={K}", f"model.vocab_size={V}", f"model.blocks={BLOCKS}", "model.max_seq_len=32",
        f"model.attention.heads={HEADS}", f"model.attention.kv_heads={KV}",
        f"model.attention.head_dim={head_dim}",
        f"model.attention.rope_theta={float(cfg.rope_parameters['rope_theta'])}",
        f"model.norm.eps={cfg.rms_norm_eps}", "target.dtype=fp32",
    ]  # fmt: skip
    net = moespec.build(SPECS / f"{name}.yaml", overrides).eval()
    loaded = net.load_state_dict(_to_moespec(hf.state_dict()), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids, labels=ids)
        got = net(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.ce_loss, want.loss, atol=1e-5, rtol=1e-5)
