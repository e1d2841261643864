"""The transformers causal-LM families whose whole networks moespec maps (Mixtral, Qwen3-MoE,
OLMoE): per family its classes, its attention's QK-norm and bias fields, its dense blocks'
width field, the config fields it refuses (named), and the transformers config of a moespec
network (``save_hf``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moespec.hf.common import field, refuse
from moespec.hf.convert import family_of
from moespec.hf.registry import Config, UnsupportedFamilyError
from moespec.ir.nodes import ModelNode, MoELayerNode


@dataclass(frozen=True)
class NetworkFamily:
    """How a transformers causal LM maps onto a moespec network.

    ``name``: the block family (:data:`moespec.hf.FAMILIES`); ``model_class`` /
    ``config_class``: the transformers classes; ``qk_norm``: the `model.attention.qk_norm` the
    family's attention has; ``bias``: the config field of the attention projections' biases
    (None: never); ``dense``: the config field of the dense blocks' MLP width (None: every
    block is MoE); ``check``: refuses config fields the network cannot follow (names them);
    ``config``: the transformers config fields of a moespec network (``save_hf``)."""

    name: str
    model_class: str
    config_class: str
    qk_norm: str
    bias: str | None
    dense: str | None
    check: Callable[[Config], None]
    config: Callable[[ModelNode, MoELayerNode], dict[str, Any]]


NETWORK_FAMILIES: dict[str, NetworkFamily] = {}


def network_family(config: Config) -> NetworkFamily:
    fam = family_of(config)
    if fam.name not in NETWORK_FAMILIES:
        raise UnsupportedFamilyError(
            f"transformers family {fam.name!r}: moespec maps its MoE blocks but not the whole network "
            f"(whole networks: {sorted(NETWORK_FAMILIES)})"
        )
    return NETWORK_FAMILIES[fam.name]


def config_head_dim(c: Config) -> int:
    return getattr(c, "head_dim", None) or field(c, "hidden_size") // field(c, "num_attention_heads")


def _check_common(c: Config) -> None:
    name = type(c).__name__
    rope = dict(field(c, "rope_parameters") or {})
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedFamilyError(
            f"{name}.rope_parameters.rope_type = {rope['rope_type']!r}: moespec's RoPE is the default "
            "(unscaled) one"
        )
    extra = sorted(set(rope) - {"rope_type", "rope_theta"})
    if extra:
        raise UnsupportedFamilyError(
            f"{name}.rope_parameters.{extra[0]} = {rope[extra[0]]!r}: moespec's RoPE takes only rope_theta"
        )
    refuse(c, "attention_dropout", lambda v: v > 0, "moespec's attention has no dropout")
    window = "a window shorter than max_position_embeddings masks keys; moespec's attention sees them all"
    refuse(c, "sliding_window", lambda v: v < field(c, "max_position_embeddings"), window)


def _check_olmoe(c: Config) -> None:
    _check_common(c)
    refuse(c, "clip_qkv", lambda v: True, "OLMoE clamps q, k and v; moespec's attention does not")
    if config_head_dim(c) * field(c, "num_attention_heads") != field(c, "hidden_size"):
        raise UnsupportedFamilyError(
            f"{type(c).__name__}.head_dim = {config_head_dim(c)}: OLMoE's q_norm is over hidden_size, so "
            "heads * head_dim must equal it"
        )


def _common_config(m: ModelNode, layer: MoELayerNode) -> dict[str, Any]:
    a = m.attention
    (group,) = layer.experts.groups
    act = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}[group.activation]
    return {
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": len(m.blocks),
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "hidden_act": act,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "num_experts_per_tok": layer.router.config.k,  # type: ignore[attr-defined]
        "output_router_logits": False,
        "pad_token_id": m.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _mixtral_config(m: ModelNode, layer: MoELayerNode) -> dict[str, Any]:
    (group,) = layer.experts.groups
    return {**_common_config(m, layer), "num_local_experts": group.count, "intermediate_size": group.width}


def _qwen3_config(m: ModelNode, layer: MoELayerNode) -> dict[str, Any]:
    (group,) = layer.experts.groups
    dense = [i for i, b in enumerate(m.blocks) if b is None]
    return {
        **_common_config(m, layer),
        "num_experts": group.count,
        "moe_intermediate_size": group.width,
        "intermediate_size": m.dense_ffn.d_ff if dense and m.dense_ffn else group.width,
        "norm_topk_prob": bool(layer.router.config.renormalize),  # type: ignore[attr-defined]
        "attention_bias": m.attention.bias,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
    }


def _olmoe_config(m: ModelNode, layer: MoELayerNode) -> dict[str, Any]:
    (group,) = layer.experts.groups
    out = {
        **_common_config(m, layer),
        "num_experts": group.count,
        "intermediate_size": group.width,
        "norm_topk_prob": bool(layer.router.config.renormalize),  # type: ignore[attr-defined]
        "attention_bias": m.attention.bias,
    }
    del out["head_dim"]  # OLMoE's head width is hidden_size / heads (checked)
    return out


for _nf in (
    NetworkFamily("mixtral", "MixtralForCausalLM", "MixtralConfig", "none", None, None, _check_common,
                  _mixtral_config),
    NetworkFamily("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "head", "attention_bias",
                  "intermediate_size", _check_common, _qwen3_config),
    NetworkFamily("olmoe", "OlmoeForCausalLM", "OlmoeConfig", "full", "attention_bias", None, _check_olmoe,
                  _olmoe_config),
):  # fmt: skip
    NETWORK_FAMILIES[_nf.name] = _nf
