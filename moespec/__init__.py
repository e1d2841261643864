"""moespec: a declarative model-spec compiler for Mixture-of-Experts layers in PyTorch."""

from moespec.errors import Diagnostic, MoespecError, Origin, SpecError
from moespec.spec import LoadedSpec, Spec, load_spec

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("build", "aux_losses", "set_step", "BuildError"):
        from moespec import api

        return getattr(api, name)
    if name == "load":
        from moespec.runtime.load import load

        return load
    if name in ("build_artifact", "ArtifactError"):
        from moespec.export import artifact

        return getattr(artifact, name)
    raise AttributeError(name)


__all__ = [
    "Diagnostic",
    "LoadedSpec",
    "MoespecError",
    "Origin",
    "Spec",
    "SpecError",
    "__version__",
    "load_spec",
]
