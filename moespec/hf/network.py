"""Whole networks from transformers models and back (docs/hf.md, "Whole networks").

``network_spec_from_config(config)``: the spec dict (layer + `model:` section) of a causal LM
config of a supported family (Mixtral, Qwen3-MoE, OLMoE). ``network_from_model(model)``: the
:class:`~moespec.runtime.network.MoENetwork` computing what the transformers model computes,
holding its weights. ``network_to_model(net, model)`` writes them back (exact);
``save_hf(net, out)`` writes a transformers checkpoint of a network whose spec matches a
family (``moespec export DIR --to-hf OUT``).

The weights move through one declarative :class:`~moespec.hf.layout.Layout` for the whole
model: the family's MoE block rules (the same as :func:`moespec.hf.from_block`'s) under
``model.layers.<i>.mlp.`` / ``blocks.<i>.ffn.``, plus rules for the embedding, attention,
norms, dense MLPs and the LM head, each shape written in the config's named dimensions. A
missing, extra or misshapen key is an error naming it; a config field that changes the
network's maths in a way the `model:` section cannot express is an error naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moespec.common.dtypes import TORCH_DTYPES
from moespec.errors import BuildError
from moespec.hf.common import activation, field
from moespec.hf.convert import _DESIGN, _check_block, _load, family_of, spec_from_config
from moespec.hf.layout import Layout, Rule
from moespec.hf.network_families import NETWORK_FAMILIES, NetworkFamily, config_head_dim, network_family
from moespec.hf.registry import Config, UnsupportedFamilyError
from moespec.ir.build import build_program
from moespec.ir.nodes import ModelNode, MoELayerNode
from moespec.runtime.network import MoENetwork, build_network
from moespec.spec.load import load_spec

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


# --- configs -> `model:` sections --------------------------------------------------------------


def network_spec_from_config(config: Config, *, name: str | None = None) -> dict:
    """The spec dict of a transformers causal LM config: :func:`moespec.hf.spec_from_config`'s
    layer plus the `model:` section of the whole network (fp32 target). Raises naming a config
    field whose maths the spec cannot express, or the family when it has no network adapter."""
    nf = network_family(config)
    nf.check(config)
    spec = spec_from_config(
        config, name=name or str(getattr(config, "model_type", nf.name)).replace("_", "-")
    )
    moe = family_of(config).moe_layers(config)
    n = field(config, "num_hidden_layers")
    if not moe:
        raise UnsupportedFamilyError(f"{type(config).__name__}: no decoder layer is MoE")
    heads = field(config, "num_attention_heads")
    attention = {
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": config_head_dim(config),
        "rope_theta": float((field(config, "rope_parameters") or {}).get("rope_theta", 10000.0)),
        "qk_norm": nf.qk_norm,
        "bias": bool(field(config, nf.bias)) if nf.bias else False,
    }
    model: dict[str, Any] = {
        "kind": "decoder_lm",
        "vocab_size": field(config, "vocab_size"),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "blocks": n,
        "max_seq_len": field(config, "max_position_embeddings"),
        "attention": attention,
        "norm": {"kind": "rmsnorm", "eps": float(field(config, "rms_norm_eps"))},
        "tie_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "moe_blocks": {"kind": "all"} if len(moe) == n else {"kind": "list", "blocks": moe},
    }
    if len(moe) < n:
        assert nf.dense is not None, nf.name
        model["dense_ffn"] = {
            "kind": "glu",
            "activation": activation(config),
            "d_ff": field(config, nf.dense),
        }
    spec["model"] = model
    spec["description"] = f"transformers' {nf.model_class} ({type(config).__name__}) as a moespec network."
    return spec


# Spec path -> the config field it comes from (comments of `moespec convert --from-hf --network`).
MODEL_SOURCES = {
    "model.vocab_size": "vocab_size",
    "model.pad_token_id": "pad_token_id",
    "model.blocks": "num_hidden_layers",
    "model.max_seq_len": "max_position_embeddings",
    "model.attention.heads": "num_attention_heads",
    "model.attention.kv_heads": "num_key_value_heads",
    "model.attention.head_dim": "head_dim (or hidden_size / num_attention_heads)",
    "model.attention.rope_theta": "rope_parameters.rope_theta",
    "model.attention.bias": "attention_bias",
    "model.norm.eps": "rms_norm_eps",
    "model.tie_embeddings": "tie_word_embeddings",
    "model.dense_ffn.d_ff": "intermediate_size",
    "model.dense_ffn.activation": "hidden_act",
    "model.moe_blocks.blocks": "decoder_sparse_step, mlp_only_layers",
}


# --- the whole model's layout -------------------------------------------------------------------


def _prefixed(rule: Rule, hf: str, ms: str) -> Rule:
    return dataclasses.replace(rule, hf=hf + rule.hf, ms=tuple(ms + k for k in rule.ms))


def network_layout(config: Config) -> Layout:
    """The layout between a transformers causal LM's state_dict and a moespec network's."""
    nf = network_family(config)
    fam = family_of(config)
    block_dims = fam.dims(config)
    heads, hd = field(config, "num_attention_heads"), config_head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or heads
    dims = {"V": field(config, "vocab_size"), "Q": heads * hd, "KV": kv * hd, "Dh": hd}
    if nf.dense is not None:
        dims["Fd"] = field(config, nf.dense)
    clash = {k for k in dims if k in block_dims and block_dims[k] != dims[k]}
    assert not clash, clash  # the block adapters' dimension names are E, F, D, S, Fs
    dims = {**block_dims, **dims}
    bias = bool(field(config, nf.bias)) if nf.bias else False
    moe = set(fam.moe_layers(config))
    rules = [Rule("model.embed_tokens.weight", ("V", "D"), ("embed_tokens.weight",), ("V", "D"))]
    for i in range(field(config, "num_hidden_layers")):
        hf, ms = f"model.layers.{i}.", f"blocks.{i}."
        block = [
            Rule("input_layernorm.weight", ("D",), ("attn_norm.weight",), ("D",)),
            Rule("post_attention_layernorm.weight", ("D",), ("ffn_norm.weight",), ("D",)),
        ]
        for proj, shape in (("q", ("Q", "D")), ("k", ("KV", "D")), ("v", ("KV", "D")), ("o", ("D", "Q"))):
            key = f"{proj}_proj.weight"
            block.append(Rule(f"self_attn.{key}", shape, (f"attn.{key}",), shape))
            if bias:
                key = f"{proj}_proj.bias"
                block.append(Rule(f"self_attn.{key}", shape[:1], (f"attn.{key}",), shape[:1]))
        if nf.qk_norm != "none":
            widths = ("Dh", "Dh") if nf.qk_norm == "head" else ("Q", "KV")
            for norm, w in zip(("q_norm", "k_norm"), widths, strict=True):
                block.append(Rule(f"self_attn.{norm}.weight", (w,), (f"attn.{norm}.weight",), (w,)))
        if i in moe:
            block += [_prefixed(r, "mlp.", "ffn.") for r in fam.rules(config)]
        else:
            for proj, shape in (("gate", ("Fd", "D")), ("up", ("Fd", "D")), ("down", ("D", "Fd"))):
                key = f"{proj}_proj.weight"
                block.append(Rule(f"mlp.{key}", shape, (f"ffn.{key}",), shape))
        rules += [_prefixed(r, hf, ms) for r in block]
    rules.append(Rule("model.norm.weight", ("D",), ("norm.weight",), ("D",)))
    if not getattr(config, "tie_word_embeddings", False):
        rules.append(Rule("lm_head.weight", ("V", "D"), ("lm_head.weight",), ("V", "D")))
    return Layout(tuple(rules), dims)


def _untie(config: Config, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state without ``lm_head.weight`` when the config ties it to the embedding (it must
    then be that tensor, or equal to it)."""
    state = dict(state)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if emb is not None and head.shape == emb.shape and not torch.equal(head, emb):
            raise BuildError(
                "lm_head.weight differs from model.embed_tokens.weight, but the config ties them "
                "(tie_word_embeddings)"
            )
    return state


def network_from_state_dict(
    config: Config,
    state: Mapping[str, Tensor],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> MoENetwork:
    """The moespec network of ``config`` holding the transformers state_dict ``state`` (keys
    of the causal LM: ``model.layers.0.self_attn.q_proj.weight``, ...), in ``dtype`` (the
    state's when None) on ``device`` (cpu when None)."""
    spec = network_spec_from_config(config)
    layout = network_layout(config)
    tensors = layout.to_moespec(_untie(config, state), what=f"{type(config).__name__} state_dict")
    if dtype is None:
        dtype = next(iter(tensors.values())).dtype
    spec["target"]["dtype"] = _DTYPE_NAMES.get(dtype, "fp32")
    net = build_network(load_spec(spec).spec, device=device or "cpu", allow_large=True)
    _load(net, tensors, "the moespec network")
    return net


def network_from_model(model: nn.Module) -> MoENetwork:
    """A moespec network computing what the transformers causal LM ``model`` computes (same
    logits), holding copies of its weights, on its device and in its dtype."""
    config = getattr(model, "config", None)
    if config is None:
        raise BuildError(f"{type(model).__name__} carries no config: not a transformers model")
    nf = network_family(config)
    _check_model(nf, model)
    fam = family_of(config)
    for i in fam.moe_layers(config):
        _check_block(fam, model.model.layers[i].mlp, config)
    p = next(model.parameters())
    return network_from_state_dict(config, model.state_dict(), device=p.device, dtype=p.dtype)


def _check_model(nf: NetworkFamily, model: nn.Module) -> None:
    if type(model).__name__ != nf.model_class:
        raise BuildError(
            f"{type(model).__name__}: a moespec network maps the causal LM {nf.model_class} (with its head)"
        )


# --- moespec networks -> transformers -------------------------------------------------------------


def _model_fields(node: ModelNode) -> dict[str, Any]:
    """What of a ModelNode makes up the network's maths (not its init or derived numbers), by
    spec path."""
    out: dict[str, Any] = {
        "kind": node.kind,
        "d_model": node.d_model,
        "vocab_size": node.vocab_size,
        "max_seq_len": node.max_seq_len,
        "norm.kind": node.norm,
        "norm.eps": node.norm_eps,
        "moe_blocks": [i for i, b in enumerate(node.blocks) if b is not None],
        "tie_embeddings": node.tie_embeddings,
    }
    out.update({f"attention.{k}": v for k, v in dataclasses.asdict(node.attention).items()})
    if any(b is None for b in node.blocks):
        assert node.dense_ffn is not None
        out.update({f"dense_ffn.{k}": v for k, v in dataclasses.asdict(node.dense_ffn).items()})
    return out


def _router_fields(layer: MoELayerNode) -> tuple:
    """The layer's design; the router's own `dtype` field is compared resolved (RouterNode.dtype)."""
    router = dataclasses.replace(layer.router, config=layer.router.config.model_copy(update={"dtype": None}))
    return (router, *(getattr(layer, f) for f in _DESIGN if f != "router"))


def _differences(net: MoENetwork, config: Config) -> list[str]:
    """Why ``net`` is not the network ``config`` describes ([] when it is)."""
    return differences(net.ir, [layer.ir for layer in net.moe_layers], config)


def differences(model: ModelNode, layers: list[MoELayerNode], config: Config) -> list[str]:
    """Why the network of ``model`` (its MoE blocks' layer IRs ``layers``, in block order) is
    not the one ``config`` describes ([] when it is): the differing `model:` fields, and the
    first MoE block whose design (router, experts, ...) differs."""
    program = build_program(load_spec(network_spec_from_config(config)).spec)
    assert program.model is not None
    want_layer = program.layers[0]
    got, want = _model_fields(model), _model_fields(program.model)
    dense = ("dense_ffn.kind" in got, "dense_ffn.kind" in want)
    out = [
        f"model.{n}: {got[n]!r} (transformers' would be {want[n]!r})"
        for n in got
        if n in want and got[n] != want[n]
    ]
    if dense[0] != dense[1]:
        out.append("model.dense_ffn: " + ("dense blocks, which the family has not" if dense[0] else "none"))
    for i, layer in enumerate(layers):
        got_l, want_l = _router_fields(layer), _router_fields(want_layer)
        names = ("router", *(f for f in _DESIGN if f != "router"))
        bad = [n for n, a, b in zip(names, got_l, want_l, strict=True) if a != b]
        if bad:
            out.append(f"MoE block {i} ({layer.name}): its {', '.join(bad)} differ")
            break
    return out


def config_of_network(net: MoENetwork) -> Config:
    """The transformers config of a family whose causal LM computes what ``net`` computes; an
    error listing, per family, why none does."""
    import transformers

    if net.kind != "decoder_lm" or not net.moe_layers:
        raise BuildError(
            f"the network ({net.kind}, {len(net.moe_layers)} MoE blocks) is not a decoder LM with MoE "
            f"blocks: it matches no transformers family (families: {sorted(NETWORK_FAMILIES)})"
        )
    first = net.moe_layers[0].ir
    why = []
    for name, nf in NETWORK_FAMILIES.items():
        try:
            config = getattr(transformers, nf.config_class)(**nf.config(net.ir, first))
            diff = _differences(net, config)
        except (BuildError, ValueError, TypeError, AttributeError) as e:
            diff = [str(e).splitlines()[0]]
        if not diff:
            config.dtype = net.dtype
            return config
        why.append(f"  {name}: " + "; ".join(diff))
    raise BuildError("the network matches no transformers family moespec exports:\n" + "\n".join(why))


def network_to_model(net: MoENetwork, model: nn.Module) -> None:
    """Write ``net``'s weights into the transformers causal LM ``model`` (the inverse of
    :func:`network_from_model`); an error when ``net`` is not the network ``model``'s config
    describes."""
    config = model.config
    nf = network_family(config)
    _check_model(nf, model)
    diff = _differences(net, config)
    if diff:
        raise BuildError(
            f"the moespec network is not the one {type(model).__name__}'s config describes:\n  "
            + "\n  ".join(diff)
        )
    tensors = network_layout(config).to_hf(dict(net.state_dict()), what="moespec network state_dict")
    own = model.state_dict(keep_vars=True)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in own:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    _load(model, tensors, type(model).__name__)


def to_hf_model(net: MoENetwork) -> nn.Module:
    """A transformers causal LM (of the family ``net`` matches) holding ``net``'s weights."""
    import transformers

    config = config_of_network(net)
    nf = network_family(config)
    with torch.device("meta"):  # no random init: every saved tensor is written below
        model = getattr(transformers, nf.model_class)(config)
    model = model.to_empty(device="cpu").to(net.dtype)
    # The rotary tables are not saved (non-persistent buffers): build them again, on the CPU.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    network_to_model(net, model)
    return model.eval()


def save_hf(net: MoENetwork, out: str | Path) -> Path:
    """Write a transformers checkpoint (config.json, model.safetensors) of ``net`` to ``out``;
    ``AutoModelForCausalLM.from_pretrained(out)`` gives the same logits."""
    model = to_hf_model(net)
    out = Path(out)
    model.save_pretrained(out)
    return out
