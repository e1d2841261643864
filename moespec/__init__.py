"""moespec: a declarative model-spec compiler for Mixture-of-Experts layers in PyTorch."""

from moespec.errors import Diagnostic, MoespecError, Origin, SpecError
from moespec.spec import LoadedSpec, Spec, load_spec

__version__ = "0.1.0"

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
