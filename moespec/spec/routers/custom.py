"""`kind: custom`: a router written by the user, named by its import path."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterSpec, at_most_routed, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


def call_custom(
    x_TD: Any, weight_ED: Any, function: str, output: str, k: int, options: dict[str, Any]
) -> tuple[Any, ...]:
    """Call a custom router function and check what it returned (shapes and dtypes are
    static, so the checks cost nothing at run time and survive torch.compile). Plain
    arguments, not the spec object, so the generated graph code can spell the call."""
    out = resolve_function(function)(x_TD, weight_ED, **options)
    return check_custom(out, x_TD, weight_ED, function, output, k)


def check_custom(out: Any, x_TD: Any, weight_ED: Any, function: str, output: str, k: int) -> tuple[Any, ...]:
    """Check what a custom router function returned (see :func:`call_custom`)."""
    want = 2 if output == "dense" else 3
    if not isinstance(out, tuple) or len(out) != want:
        raise TypeError(f"custom router {function} must return a tuple of {want} tensors (output: {output})")
    t, e = x_TD.shape[0], weight_ED.shape[0]
    expect = [("logits_TE", (t, e))] + (
        [("gates_TE", (t, e))] if output == "dense" else [("weight_TK", (t, k)), ("idx_TK", (t, k))]
    )
    for value, (name, shape) in zip(out, expect, strict=True):
        if tuple(value.shape) != shape:
            raise ValueError(
                f"custom router {function}: {name} has shape {tuple(value.shape)}, expected {shape}"
            )
    if output == "topk" and out[2].is_floating_point():
        raise TypeError(f"custom router {function}: idx_TK must be an integer tensor")
    return out


def resolve_function(path: str) -> Callable[..., Any]:
    """Import ``package.module:function`` (raises ImportError / AttributeError / TypeError)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected `package.module:function`, got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj


@ROUTERS.register
class CustomRouter(RouterSpec):
    """A router you write yourself, without forking moespec. `function` names an importable
    function (`package.module:function`) called as ``fn(x_TD, weight_ED, **options)`` with
    the tokens x [T, D] and the layer's linear router weight [E, D] (``router.weight``,
    trained; the function may ignore it). With `output: topk` it returns
    ``(logits_TE, weight_TK, idx_TK)``: router logits [T, E], combine weights [T, k] and
    chosen experts [T, k] (int64); with `output: dense` it returns ``(logits_TE, gates_TE)``
    and a token uses every expert whose gate is nonzero. ``softmax(logits_TE)`` feeds the
    balance losses and statistics, ``logits_TE`` the z-loss and ``router_logits``. The
    function must be traceable torch code (no host syncs) to run under torch.compile; it
    is its own reference. Only `options` are passed (put `k` there too if the function needs
    it); returned shapes are checked. See ``moespec/examples/custom_router.py``."""

    kind: Literal["custom"] = Field(description="A user-supplied router function.")
    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="Import path `package.module:function` of the router function.",
    )
    output: Literal["topk", "dense"] = Field(
        description="`topk`: the function returns (logits, weight [T, k], idx [T, k]); `dense`: "
        "(logits, gates [T, E]), nonzero gates select."
    )
    k: int = Field(
        gt=0,
        description="Experts per token: exactly k for `topk`; for `dense` the expected count "
        "(derived numbers and balance-loss normalisation).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function (plain YAML values)."
    )

    def experts_per_token(self, layer: LayerSpec) -> float:
        return self.k

    def nominal_k(self, layer: LayerSpec) -> int | None:
        return self.k if self.output == "dense" else None

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from at_most_routed(layer, at, "k", self.k)
        if self.output == "dense":
            yield from unusable(layer, at, "capacity", "a `dense` custom router needs capacity: dropless")
        try:
            fn = resolve_function(self.function)
        except Exception as exc:  # any import-time failure is the user's to see, located
            yield (*at, "function"), f"cannot import {self.function}: {type(exc).__name__}: {exc}"
            return
        try:
            inspect.signature(fn).bind(None, None, **self.options)
        except TypeError as exc:
            yield (
                (*at, "options"),
                f"{self.function} cannot be called as fn(x_TD, weight_ED, **options): {exc}",
            )
        except ValueError:
            pass  # builtins without a signature: checked when called
