"""Shared pieces of the spec models: the strict base class, dtypes and kind registries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["fp32", "bf16", "fp16", "fp64"]
BYTES_PER_DTYPE: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, `"8"` is not 8, objects are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class KindRegistry:
    """A ``kind -> model`` registry from which a discriminated union is built.

    A new router (or noise, capacity, loss ...) is one class decorated with
    ``@REGISTRY.register``; the spec language does not change shape for it.
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self.kinds: dict[str, type[Strict]] = {}

    def register(self, cls: type[Strict]) -> type[Strict]:
        """Class decorator: add ``cls`` under the single value of its ``kind`` Literal."""
        (kind,) = cls.model_fields["kind"].annotation.__args__  # type: ignore[union-attr]
        assert kind not in self.kinds, f"duplicate {self.family} kind {kind!r}"
        self.kinds[kind] = cls
        return cls

    def union(self) -> Any:
        """The union of every registered kind, discriminated by ``kind``."""
        members = tuple(self.kinds.values())
        if len(members) == 1:
            return members[0]
        return Annotated[Union[members], Field(discriminator="kind")]  # noqa: UP007


T = TypeVar("T")


class KindTable(Generic[T]):
    """What another layer of the compiler provides per kind of a :class:`KindRegistry`: the
    reference function of each router kind, the FX lowering of each router kind.

    ``@TABLE.register("kind")`` adds one; the kind must be one the spec registry knows and
    may be registered once, so a misspelt or doubled kind fails at import. A test checks
    that every table holds exactly the spec registry's kinds, so a half-added kind fails at
    once.
    """

    def __init__(self, what: str, kinds: KindRegistry) -> None:
        self.what, self.kinds = what, kinds
        self.items: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        """Decorator: ``obj`` is the ``what`` of ``kind``."""

        def deco(obj: T) -> T:
            assert kind in self.kinds.kinds, f"{self.what} for unknown {self.kinds.family} kind {kind!r}"
            assert kind not in self.items, f"duplicate {self.what} for {self.kinds.family} kind {kind!r}"
            self.items[kind] = obj
            return obj

        return deco

    def get(self, kind: str) -> T:
        """The entry of ``kind``; NotImplementedError naming what is missing."""
        if kind not in self.items:
            raise NotImplementedError(f"{self.kinds.family} kind {kind!r} has no {self.what}")
        return self.items[kind]
