"""Specs from transformers configs, moespec layers from transformers MoE blocks, and back.

``spec_from_config(config)``: the spec dict of the config's MoE layers (one layer design; the
decoder layers it applies to are named in the description). ``from_block(block, config)``:
a moespec layer holding the block's weights. ``to_block(layer, block)``: writes the layer's
weights into the block (the exact inverse). The weights move through the family's declarative
layout (:mod:`moespec.hf.layout`): every key and shape is checked, loudly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moespec.common.dtypes import TORCH_DTYPES
from moespec.errors import BuildError
from moespec.hf.layout import check_keys
from moespec.hf.registry import FAMILIES, Config, Family, UnsupportedFamilyError, family_of_module
from moespec.hf.table import require
from moespec.ir.build import build_program
from moespec.runtime.build import build_layer
from moespec.runtime.layer import MoELayer
from moespec.spec.load import load_spec

_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def family_of(obj: object) -> Family:
    """The adapter of the family ``obj`` (a block or a config) comes from; an error naming the
    family and why when it has none."""
    name = family_of_module(obj)
    if name is None:
        raise UnsupportedFamilyError(
            f"{type(obj).__name__} (module {type(obj).__module__}) is not from transformers.models"
        )
    require(name)
    return FAMILIES[name]


def spec_from_config(config: Config, *, name: str | None = None) -> dict:
    """The moespec spec dict of ``config``'s MoE layers (fp32 target: the layer is cast to the
    block's dtype by :func:`from_block`). Raises naming a config field whose MoE maths moespec
    cannot express, or the family and why when it is unsupported."""
    fam = family_of(config)
    fam.check(config)
    layer = fam.layer(config)
    layer.setdefault("capacity", {"kind": "dropless"})
    moe = fam.moe_layers(config)
    model_type = getattr(config, "model_type", fam.name)
    return {
        "moespec": 1,
        "name": name or f"{model_type}-moe".replace("_", "-"),
        "description": (
            f"MoE layer of transformers' {type(config).__name__} ({len(moe)} of "
            f"{getattr(config, 'num_hidden_layers', '?')} decoder layers are MoE: {ranges(moe)})."
        ),
        "d_model": int(config.hidden_size),
        "layer": layer,
        "target": {"dtype": "fp32", "router_dtype": "fp32"},
    }


def ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for i in idx:
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out) or "none"


def config_of(block: nn.Module) -> Config | None:
    """The config a block carries (itself or a submodule: transformers' experts modules keep
    theirs), or None."""
    for m in block.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and not isinstance(cfg, nn.Module):
            return cfg
    return None


def _check_block(fam: Family, block: nn.Module, config: Config | None) -> Config:
    cls = type(block).__name__
    if cls not in fam.blocks:
        raise BuildError(
            f"{cls} is not an MoE block of transformers family {fam.name!r} "
            f"(its MoE blocks: {list(fam.blocks)})"
        )
    config = config if config is not None else config_of(block)
    if config is None:
        raise BuildError(f"{cls} carries no config: pass it, from_block(block, config)")
    experts = getattr(block, "experts", None)
    for flag, want in fam.experts_flags.items():
        got = getattr(experts, flag, want)
        if got != want:
            key = f"experts.{'gate_up_proj' if flag != 'has_bias' else 'gate_up_proj_bias'}"
            raise BuildError(
                f"{key}: the block's experts have {flag}={got}, the {fam.name} layout maps {flag}={want}"
            )
    return config


# The IR fields that make up the maths of a layer (not its name, dtype or derived numbers).
_DESIGN = ("router", "dispatch", "experts", "shared", "combine", "heads")


def block_tensors(block: nn.Module) -> dict[str, Tensor]:
    """The block's parameters and persistent buffers by key (relative to the block)."""
    return dict(block.state_dict(keep_vars=True))


def _dtype(block: nn.Module) -> torch.dtype:
    experts = getattr(block, "experts", block)
    return next(experts.parameters()).dtype


def from_block(block: nn.Module, config: Config | None = None) -> MoELayer:
    """A moespec layer computing what ``block`` computes, holding (copies of) its weights, on
    its device and in its dtype (the router keeps computing in fp32, as transformers' do). A
    frozen block parameter (``requires_grad=False``, e.g. experts frozen for fine-tuning)
    gives frozen moespec parameters."""
    fam = family_of(block)
    config = _check_block(fam, block, config)
    spec = spec_from_config(config)
    dtype = _dtype(block)
    spec["target"]["dtype"] = _DTYPE_NAMES.get(dtype, "fp32")
    device = next(block.parameters()).device
    layout = fam.layout(config)
    hf = block_tensors(block)
    tensors = layout.to_moespec(hf, what=f"{type(block).__name__} state_dict")
    layer = build_layer(load_spec(spec).spec, device=device, allow_large=True)
    _load(layer, tensors, f"the moespec layer of {type(block).__name__}")
    own = dict(layer.named_parameters())
    for rule in layout.rules:
        src = hf[rule.hf]
        if isinstance(src, nn.Parameter) and not src.requires_grad:
            for key in rule.ms:
                if key in own:
                    own[key].requires_grad_(False)
    return layer


def _load(module: nn.Module, tensors: dict[str, Tensor], what: str) -> None:
    """Copy ``tensors`` into ``module``'s state (same keys and shapes, else an error naming them)."""
    own = module.state_dict(keep_vars=True)
    check_keys(tensors, list(own), what)
    bad = [
        f"{k}: {list(t.shape)} into {list(own[k].shape)}"
        for k, t in tensors.items()
        if t.shape != own[k].shape
    ]
    if bad:
        raise BuildError(f"{what}: wrong shapes\n  " + "\n  ".join(bad))
    with torch.no_grad():
        for k, t in tensors.items():
            own[k].copy_(t)


def to_block(layer: MoELayer, block: nn.Module, config: Config | None = None) -> None:
    """Write ``layer``'s weights into ``block`` (the inverse of :func:`from_block`); an error
    when the layer computes another design than the block's config describes (weights of the
    right shapes would otherwise land in a block that routes them differently)."""
    fam = family_of(block)
    config = _check_block(fam, block, config)
    want = build_program(load_spec(spec_from_config(config)).spec).layers[0]
    differ = [f for f in _DESIGN if getattr(layer.ir, f) != getattr(want, f)]
    if differ:
        raise BuildError(
            f"the moespec layer's {', '.join(differ)} differ from what {type(block).__name__}'s config "
            "describes: it was not built for this block (moespec.hf.spec_from_config shows the design)"
        )
    tensors = fam.layout(config).to_hf(dict(layer.state_dict()), what="moespec layer state_dict")
    _load(block, tensors, f"{type(block).__name__}")
