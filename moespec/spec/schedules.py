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
Integer fields are rounded half to even (:func:`round_half_even`), as SMoE-Dropout's released
code does with Python's ``round``: ``round((k_max - k_min)·t / T) + k_min``, so at steps 25000,
125000, 225000 and 325000 of its 8 -> 16 ramp over 400000 steps k is 8, 10, 12, 14.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, TypeVar, Union

from pydantic import Field

from moespec.spec.base import Strict

V = TypeVar("V")


class _Curve(Strict):
    param: str = Field(
        pattern=r"^router\.[a-z_]+$",
        description="The scheduled field, e.g. `router.k`, `router.temperature`. An integer field "
        "(`router.k`) takes the curve's value rounded half to even, as Python's `round` in "
        "SMoE-Dropout's released code (k 8 -> 16 over 400000 steps is 8 at step 25000, 10 at 125000).",
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


def round_half_even(v: V) -> V:
    """Round to the nearest integer, halves to even (Python's ``round``, ``torch.round``).

    Written with operators a Python float and a float tensor share, so the range check in
    validation and the schedule the module evaluates in its graph round with the same function;
    the result has ``v``'s type (a whole float, or a float tensor). An exact half is detected
    after the ``+ 0.5``, which also sends 0.49999999999999994 (whose ``+ 0.5`` rounds to 1.0)
    back to 0.
    """
    f = (v + 0.5) // 1
    return f - ((v + 0.5 == f) & (f % 2 == 1)) * 1


def curve_values(sched: Schedule) -> list[float]:
    """The values a curve passes through at its ends (for range checks)."""
    if isinstance(sched, MultiStepSchedule):
        return list(sched.values)
    return [sched.start, sched.end]
