"""Step schedules: hyper-parameters that change over training steps without recompiling.

A layer's ``schedules`` list names a schedulable field (``router.k``, ``router.temperature``;
each router kind declares its own in :meth:`RouterSpec.schedulable`) and a curve over the
step. The module evaluates the curves on the host at every forward from its step counter
(``layer.set_step(n)`` / ``moespec.set_step(model, n)``) and feeds the values to the graph as
0-dim tensors, so changing them never recompiles; a scheduled k is compiled at the spec's k
(the maximum) and masked down.

Curves (``t = min(step, steps) / steps``; ``steps`` counts from ``start_step``):
- ``linear``: start + (end - start)·t;
- ``cosine``: end + (start - end)·(1 + cos(π t)) / 2;
- ``exponential``: start·(end / start)^t (both > 0);
- ``multistep``: ``values[i]`` from ``milestones[i-1]`` on (``values[0]`` before the first).
Integer fields are rounded half away from zero, as SMoE-Dropout's
``round((k_max - k_min)·t / T) + k_min``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field

from moespec.spec.base import Strict


class _Curve(Strict):
    param: str = Field(
        pattern=r"^router\.[a-z_]+$",
        description="The scheduled field, e.g. `router.k`, `router.temperature`.",
    )


class _Ramp(_Curve):
    start: float = Field(description="Value at `start_step` and before.")
    end: float = Field(description="Value from `start_step + steps` on.")
    steps: int = Field(gt=0, description="Steps the ramp takes.")
    start_step: int = Field(0, ge=0, description="Step at which the ramp begins.")

    def _t(self, step: int) -> float:
        return min(max(step - self.start_step, 0), self.steps) / self.steps


class LinearSchedule(_Ramp):
    """start + (end - start)·t, t the ramp's progress in [0, 1]."""

    kind: Literal["linear"] = Field(description="Linear ramp.")

    def value(self, step: int) -> float:
        """The value at ``step``."""
        return self.start + (self.end - self.start) * self._t(step)


class CosineSchedule(_Ramp):
    """end + (start - end)·(1 + cos(π t)) / 2 (half-cosine from start to end)."""

    kind: Literal["cosine"] = Field(description="Half-cosine ramp.")

    def value(self, step: int) -> float:
        """The value at ``step``."""
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * self._t(step))) / 2


class ExponentialSchedule(_Ramp):
    """start·(end / start)^t: geometric interpolation (start and end > 0)."""

    kind: Literal["exponential"] = Field(description="Geometric ramp.")

    def value(self, step: int) -> float:
        """The value at ``step``."""
        return self.start * (self.end / self.start) ** self._t(step)


class MultiStepSchedule(_Curve):
    """Piecewise constant: ``values[0]`` until ``milestones[0]``, then ``values[1]``, ..."""

    kind: Literal["multistep"] = Field(description="Piecewise-constant steps.")
    milestones: list[int] = Field(min_length=1, description="Increasing steps at which the value changes.")
    values: list[float] = Field(min_length=2, description="One more value than milestones.")

    def value(self, step: int) -> float:
        """The value at ``step``."""
        return self.values[sum(step >= m for m in self.milestones)]


Schedule = Annotated[
    Union[LinearSchedule, CosineSchedule, ExponentialSchedule, MultiStepSchedule],  # noqa: UP007
    Field(discriminator="kind"),
]


def round_half_away(v: float) -> int:
    """Round half away from zero (Python's round() is banker's rounding)."""
    return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)


def curve_values(sched: Schedule) -> list[float]:
    """The values a curve passes through at its ends (for range checks)."""
    if isinstance(sched, MultiStepSchedule):
        return list(sched.values)
    return [sched.start, sched.end]
