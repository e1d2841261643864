"""transformers interop: specs from configs, moespec layers from MoE blocks and back, patched
models (docs/hf.md).

    spec = moespec.hf.spec_from_config(config)   # a spec dict for the config's MoE layers
    layer = moespec.hf.from_block(block, config) # a moespec layer holding the block's weights
    moespec.hf.to_block(layer, block)            # writes the weights back (round trip)
    report = moespec.hf.patch(model)             # every MoE block replaced in place

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
from moespec.hf.patch import PatchedBlock, PatchReport, patch
from moespec.hf.registry import FAMILIES, UnsupportedFamilyError

__all__ = [
    "FAMILIES",
    "PatchReport",
    "PatchedBlock",
    "UnsupportedFamilyError",
    "from_block",
    "patch",
    "spec_from_config",
    "to_block",
]
