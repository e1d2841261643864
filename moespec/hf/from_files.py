"""``moespec convert --from-hf CONFIG.json|MODEL_DIR``: a transformers config read from disk
(nothing downloaded) and written as a commented spec."""

from __future__ import annotations

import json
from pathlib import Path

from moespec.errors import BuildError
from moespec.hf.convert import family_of, ranges, spec_from_config
from moespec.hf.registry import Config
from moespec.hf.yaml_out import spec_yaml
from moespec.resources import schema_path
from moespec.spec.load import load_spec


def load_config(path: str | Path) -> Config:
    """The transformers config in ``path`` (a config.json, or a model directory holding one);
    a composite (vision-language) config gives its text config."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{file}: cannot read a transformers config: {e}") from e
    if "model_type" not in data:
        raise BuildError(f"{file}: no model_type, so not a transformers config")
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(data.pop("model_type"), **data)
    except (ValueError, KeyError) as e:
        raise BuildError(f"{file}: transformers cannot build its config: {e}") from e
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def convert_text(path: str | Path, *, network: bool = False) -> str:
    """The spec YAML of the config at ``path``, with comments naming the source fields; with
    ``network`` the whole network's `model:` section too (:mod:`moespec.hf.network`)."""
    config = load_config(path)
    fam = family_of(config)
    if network:
        from moespec.hf.network import MODEL_SOURCES, network_spec_from_config

        spec = network_spec_from_config(config)
    else:
        spec = spec_from_config(config)
    load_spec(spec)  # an invalid result (a config moespec rejects, k > experts, ...) is an error
    moe = fam.moe_layers(config)
    rest = (
        "the others are the model's dense_ffn." if network else "the others are dense MLPs outside this spec."
    )
    header = [
        f"yaml-language-server: $schema={schema_path().resolve().as_uri()}",
        f"Converted by `moespec convert --from-hf {path}` from transformers' {type(config).__name__}",
        f"(family {fam.name}). Decoder layers {ranges(moe)} of {getattr(config, 'num_hidden_layers', '?')} "
        "are MoE;",
        f"{rest} Comments name the config field of each value.",
    ]
    sources = {"d_model": "hidden_size", **fam.sources, **(MODEL_SOURCES if network else {})}
    return spec_yaml(spec, sources, header)
