"""Parameter names, shapes and initialisation of one MoE layer, for the reference's callers.

The table itself is an IR fact (:mod:`moespec.ir.params`, which documents every name) and the
init is shared with the module (:mod:`moespec.common.params`); this module gives them the
reference's spec-level signatures.
"""

from __future__ import annotations

from moespec.common.params import buffer_names, param_shapes
from moespec.common.params import init_layer_params as init_reference_params

__all__ = ["BUFFERS", "buffer_names", "init_reference_params", "param_shapes"]

BUFFERS = ("router.expert_bias",)
"""Buffers of the top-k router; :func:`buffer_names` gives those of any layer."""
