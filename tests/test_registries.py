"""The three router registries hold the same kinds, so a half-added router fails at once."""

from __future__ import annotations

import pytest

from moespec.lower.routers import LOWERINGS
from moespec.reference.routers import REFERENCE_ROUTERS
from moespec.spec.base import KindRegistry, KindTable
from moespec.spec.routers import ROUTERS, RouterSpec


def test_spec_reference_and_lowering_registries_agree() -> None:
    kinds = set(ROUTERS.kinds)
    assert set(REFERENCE_ROUTERS.items) == kinds, "router kinds without (or with an extra) reference"
    assert set(LOWERINGS.items) == kinds, "router kinds without (or with an extra) FX lowering"
    assert len(kinds) >= 12


def test_every_router_spec_is_a_router_spec() -> None:
    for kind, cls in ROUTERS.kinds.items():
        assert issubclass(cls, RouterSpec), kind


def test_a_table_refuses_unknown_and_duplicate_kinds() -> None:
    table: KindTable[int] = KindTable("thing", ROUTERS)
    table.register("topk")(1)
    with pytest.raises(AssertionError, match="duplicate thing"):
        table.register("topk")(2)
    with pytest.raises(AssertionError, match="unknown router kind 'nope'"):
        table.register("nope")(3)
    with pytest.raises(NotImplementedError, match="router kind 'hash' has no thing"):
        table.get("hash")
    assert table.get("topk") == 1
    assert isinstance(ROUTERS, KindRegistry)
