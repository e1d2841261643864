"""transformers interop: specs from configs, moespec layers from MoE blocks and back, patched
models (docs/hf.md).

    spec = moespec.hf.spec_from_config(config)   # a spec dict for the config's MoE layers
    layer = moespec.hf.from_block(block, config) # a moespec layer holding the block's weights
    moespec.hf.to_block(layer, block)            # writes the weights back (round trip)
    report = moespec.hf.patch(model)             # every MoE block replaced in place
    net = moespec.hf.network_from_model(model)   # a whole causal LM as a moespec network
    moespec.hf.save_hf(net, "out/")              # and back to a transformers checkpoint

Nothing here imports transformers at import time: adapters read configs and blocks by their
attributes and class names. Families register in ``families_*.py``; ``table.py`` says why
the others are not supported.
"""

from moespec.hf import (  # noqa: F401
    families_clamped,
    families_core,
    families_extra,
    families_more,
    families_special,
)
from moespec.hf.convert import from_block, spec_from_config, to_block
from moespec.hf.network import (
    config_of_network,
    network_from_model,
    network_from_state_dict,
    network_spec_from_config,
    network_to_model,
    save_hf,
    to_hf_model,
)
from moespec.hf.patch import PatchedBlock, PatchReport, patch
from moespec.hf.registry import FAMILIES, UnsupportedFamilyError

__all__ = [
    "FAMILIES",
    "PatchReport",
    "PatchedBlock",
    "UnsupportedFamilyError",
    "config_of_network",
    "from_block",
    "network_from_model",
    "network_from_state_dict",
    "network_spec_from_config",
    "network_to_model",
    "patch",
    "save_hf",
    "spec_from_config",
    "to_block",
    "to_hf_model",
]
