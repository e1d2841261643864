"""Evaluate step schedules as tensor math on the module's step counter.

The curves are those of :mod:`moespec.spec.schedules` (whose ``value(step)`` is the plain
Python definition the tests compare against). Evaluating them with torch ops on a 0-dim
step tensor keeps the forward free of host syncs and of Python values that change every
step, so torch.compile traces the schedule once instead of recompiling per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moespec.spec.schedules import MultiStepSchedule, Schedule, round_half_even


def evaluate(sched: Schedule, step: Tensor, *, integer: bool) -> Tensor:
    """The schedule's value at ``step`` (0-dim int64) as a 0-dim tensor: float32, or int64
    rounded half to even for integer fields (:func:`round_half_even`, the function validation's
    range check uses)."""
    s = step.to(torch.float64)
    if isinstance(sched, MultiStepSchedule):
        milestones = torch.tensor(sched.milestones, dtype=torch.float64, device=step.device)
        values = torch.tensor(sched.values, dtype=torch.float64, device=step.device)
        v = values[(s >= milestones).sum()]
    else:
        t = ((s - sched.start_step).clamp(0, sched.steps)) / sched.steps
        if sched.kind == "linear":
            v = sched.start + (sched.end - sched.start) * t
        elif sched.kind == "cosine":
            v = sched.end + (sched.start - sched.end) * (1 + torch.cos(math.pi * t)) / 2
        else:  # exponential
            v = sched.start * torch.pow(torch.as_tensor(sched.end / sched.start, dtype=torch.float64), t)
    if integer:
        return round_half_even(v).to(torch.int64)
    return v.to(torch.float32)
