"""moespec: a declarative model-spec compiler for Mixture-of-Experts layers in PyTorch.

The public API is ``__all__``: ``build`` a layer from a spec, ``load`` an artifact directory,
``build_artifact`` to write one, ``parallelize`` / ``reduce_gradients`` for expert
parallelism, ``aux_losses`` / ``set_step`` over a model's moespec layers,
``release_buffers`` to free the CPU kernels' scratch memory, ``MoELayer``, the spec models and
the error types. The torch-heavy names are imported on first use, so ``import moespec`` (and
``moespec validate``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moespec.errors import (
    ArtifactError,
    BuildError,
    Diagnostic,
    IRError,
    MoespecError,
    Origin,
    SpecError,
    TargetError,
)
from moespec.spec import LoadedSpec, Spec, load_spec

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moespec.api import aux_losses, build, load, set_step
    from moespec.export.artifact import build_artifact
    from moespec.ops import release_buffers
    from moespec.parallel import parallelize, reduce_gradients
    from moespec.runtime.layer import MoELayer
    from moespec.runtime.network import MoENetwork
    from moespec.runtime.replay import RoutingRecording, record_routing, replay_routing

# name -> module that defines it (imported lazily: each pulls in torch).
_LAZY = {
    "build": "moespec.api",
    "aux_losses": "moespec.api",
    "set_step": "moespec.api",
    "load": "moespec.api",
    "parallelize": "moespec.parallel",
    "reduce_gradients": "moespec.parallel",
    "build_artifact": "moespec.export.artifact",
    "MoELayer": "moespec.runtime.layer",
    "MoENetwork": "moespec.runtime.network",
    "release_buffers": "moespec.ops",
    "record_routing": "moespec.runtime.replay",
    "replay_routing": "moespec.runtime.replay",
    "RoutingRecording": "moespec.runtime.replay",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moespec' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "BuildError",
    "Diagnostic",
    "IRError",
    "LoadedSpec",
    "MoELayer",
    "MoENetwork",
    "MoespecError",
    "Origin",
    "RoutingRecording",
    "Spec",
    "SpecError",
    "TargetError",
    "__version__",
    "aux_losses",
    "build",
    "build_artifact",
    "load",
    "load_spec",
    "parallelize",
    "record_routing",
    "reduce_gradients",
    "release_buffers",
    "replay_routing",
    "set_step",
]
