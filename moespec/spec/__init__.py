"""The moespec spec language: YAML loading, composition, pydantic models and validation."""

from moespec.spec.load import LoadedSpec, load_spec
from moespec.spec.schema import LayerSpec, Spec

__all__ = ["LayerSpec", "LoadedSpec", "Spec", "load_spec"]
