"""The router-spec contract: what every router kind tells the rest of the compiler.

A router kind is one :class:`RouterSpec` subclass with a ``kind`` Literal, registered with
``@ROUTERS.register``. Besides its fields it answers, from the layer it sits in:

- :meth:`RouterSpec.checks`: semantic problems pydantic cannot see (k > E, ...);
- :meth:`RouterSpec.experts_per_token`: routed experts computed per token on average, for
  active parameters and FLOPs (may be fractional);
- :meth:`RouterSpec.router_macs`: router multiply-accumulates per token;
- :meth:`RouterSpec.params`: the router's parameters and buffers (names under ``router.``);
- :meth:`RouterSpec.extra_inputs`: per-token inputs the layer takes besides x (hash routing's
  ``input_ids``), each an :class:`ExtraInput`;
- :attr:`RouterSpec.score_fn`: the score function the balance losses and the entropy read;
- :meth:`RouterSpec.nominal_k`, :attr:`RouterSpec.causal`, :meth:`RouterSpec.schedulable`,
  :attr:`RouterSpec.topk_of_scores`;
- which layer settings it cannot use: :func:`unusable` inside ``checks``.

Validation, the IR, the lowering, the reference and the runtime all read this contract; none
of them asks for a router by kind. The reference function and the FX lowering of a kind
live in ``moespec.reference.routers.<kind>`` and ``moespec.lower.routers.<kind>``,
registered under the same kind (``REFERENCE_ROUTERS.register("kind")``,
``LOWERINGS.register("kind")``); a test checks that the three registries agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from moespec.spec.base import KindRegistry, Strict

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec

ROUTERS = KindRegistry("router")
NOISES = KindRegistry("noise")

Path = tuple[str | int, ...]
Problem = tuple[Path, str]


@dataclass(frozen=True)
class ExtraInput:
    """An input the layer takes besides x, by keyword: per token (shape x.shape[:-1], or
    flattened [T]) plus ``trailing`` dims; the graph gets it as [T, *trailing]. An
    ``optional`` one defaults to zeros (the previous layer's router logits for the first
    layer of a MoE++ stack); ``dtype`` is ``"float"`` (cast to x's dtype) or ``"int"``."""

    name: str
    trailing: tuple[int, ...] = ()
    optional: bool = False
    dtype: Literal["int", "float"] = "int"


@dataclass(frozen=True)
class RouterParam:
    """One router tensor: ``shape``, how it starts (``normal`` N(0, 0.02²), ``zeros``,
    ``ones``, ``orthogonal`` or ``xavier`` (uniform) with gain ``gain``, ``uniform``
    U(-gain, gain)), and whether it
    is a buffer (state, not trained by gradient; still in ``state_dict``). ``value``, when
    set, computes the initial tensor from the spec instead (``init`` is then ignored and no
    random draw is taken): a fixed table (hash routing's int64 ``router.table``, whose dtype
    is kept) or a constant start (a learnable log-temperature). ``controller`` marks a
    running controller's state (a buffer updated after each training forward, e.g. the
    expert bias), which stays fp32 whatever the layer's dtype."""

    shape: tuple[int, ...]
    init: str = "normal"
    buffer: bool = False
    gain: float = 1.0
    value: Callable[[], Any] | None = field(default=None, compare=False)
    controller: bool = False


class RouterSpec(Strict):
    """Base class of router specs (see the module docstring). Defaults fit a linear router
    ``router.weight [E, D]`` with no extra checks."""

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        """Semantic problems of this router inside ``layer`` (``at``: path to the router)."""
        return iter(())

    def experts_per_token(self, layer: LayerSpec) -> float:
        """Routed experts run per token, on average (k for top-k)."""
        raise NotImplementedError

    def rows_per_token(self, layer: LayerSpec) -> int:
        """Static upper bound on routed (token, expert) rows per token (dispatch buffers)."""
        return max(1, round(self.experts_per_token(layer)))

    def nominal_k(self, layer: LayerSpec) -> int | None:
        """The k the balance losses normalise by for a dense-form routing (None: the
        token-choice K itself)."""
        return None

    def extra_inputs(self, layer: LayerSpec) -> tuple[ExtraInput, ...]:
        """Per-token inputs besides x the router reads (none by default)."""
        return ()

    @property
    def own_dtype(self) -> str | None:
        """The router's own compute ``dtype`` field, for kinds that have one (None: use
        ``target.router_dtype``)."""
        return getattr(self, "dtype", None)

    @property
    def score_fn(self) -> str:
        """The score function (``softmax`` or ``sigmoid``) whose per-token distribution the
        balance losses and the router-entropy statistic read (softmax by default)."""
        return "softmax"

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        """Router multiply-accumulates per token at inference (a linear router: D·E)."""
        return d_model * layer.experts.n_routed

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        """Router parameters and buffers by name (``router.*``), in init order."""
        return {"router.weight": RouterParam((layer.experts.n_routed, d_model))}

    def active_router_params(self, layer: LayerSpec, d_model: int) -> int:
        """Router parameters used per token at inference (training-only ones excluded)."""
        return sum(numel(p.shape) for p in self.params(layer, d_model).values() if not p.buffer)

    def schedulable(self) -> dict[str, type]:
        """Fields a `schedules:` entry may drive (``router.<field>`` -> int or float); a
        scheduled int is bounded by the spec's value (compiled at it, masked down)."""
        return {}

    @property
    def causal(self) -> bool:
        """False for routers whose choice for a token depends on later tokens."""
        return True

    @property
    def topk_of_scores(self) -> bool:
        """Whether each token's experts are a top-k of its scores over all experts (before
        any selection-only bias or group limit), so a balance loss may count that plain
        top-k instead of the selection (`count: unbiased_topk`). False by default."""
        return False


def at_most_routed(layer: LayerSpec, at: Path, name: str, value: int | None) -> Iterator[Problem]:
    """``router.<name>`` (k, max_k, ...) above the layer's routed experts: a problem."""
    n = layer.experts.n_routed
    if value is not None and value > n:
        yield (*at, name), f"{name}={value} exceeds the number of routed experts ({n})"


# Layer settings a router may be unable to use, and when they are in use.
_IN_USE: dict[str, Callable[[LayerSpec], bool]] = {
    "capacity": lambda layer: layer.capacity.kind != "dropless",
    "losses.load_balance": lambda layer: layer.losses.load_balance is not None,
    "losses.z_loss": lambda layer: layer.losses.z_loss is not None,
}


def unusable(layer: LayerSpec, at: Path, setting: str, message: str) -> Iterator[Problem]:
    """A problem at ``setting`` of the layer around the router (``at`` ends with "router"),
    saying ``message``, when the layer uses it: ``capacity`` other than dropless, a
    ``losses.load_balance`` or a ``losses.z_loss``."""
    if _IN_USE[setting](layer):
        yield (*at[:-1], *setting.split(".")), message


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
