"""Fixtures for the reference-op tests: tiny layer specs built from dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moespec.spec.schema import LayerSpec


def build_layer(
    *,
    router: dict[str, Any] | None = None,
    routed: list[dict[str, Any]] | None = None,
    shared: dict[str, Any] | None = None,
    zero_compute: list[dict[str, Any]] | None = None,
    capacity: dict[str, Any] | None = None,
    losses: dict[str, Any] | None = None,
) -> LayerSpec:
    """A validated LayerSpec; defaults: 8 GLU/SiLU experts of width 32, top-2 softmax router."""
    experts: dict[str, Any] = {
        "routed": routed or [{"kind": "glu", "activation": "silu", "d_ff": 32, "count": 8}],
    }
    if shared is not None:
        experts["shared"] = shared
    if zero_compute is not None:
        experts["zero_compute"] = zero_compute
    spec: dict[str, Any] = {"experts": experts, "router": {"kind": "topk", "k": 2, **(router or {})}}
    if capacity is not None:
        spec["capacity"] = capacity
    if losses is not None:
        spec["losses"] = losses
    return LayerSpec.model_validate(spec)


@pytest.fixture
def make_layer() -> Callable[..., LayerSpec]:
    """Factory fixture around :func:`build_layer`."""
    return build_layer
