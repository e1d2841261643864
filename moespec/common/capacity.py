"""Capacity formulas (how many rows an expert may take), shared by the reference and the ops.

Token choice (``capacity: factor``): C = max(ceil(factor · T · k / E), min_capacity), with the
spec's ``train_factor`` while training and ``eval_factor`` otherwise (:func:`capacity_factor`).
Expert choice: C = min(max(round(cf · T / E), min_capacity), T).
"""

from __future__ import annotations

import math

from moespec.spec.sparsity import CapacityFactor


def capacity_factor(capacity: CapacityFactor, training: bool) -> float:
    """The spec's factor for the mode: ``train_factor`` while training, ``eval_factor`` in eval."""
    return capacity.train_factor if training else capacity.eval_factor


def expert_capacity(factor: float, n_tokens: int, k: int, n_experts: int, min_capacity: int) -> int:
    """C = max(ceil(factor * T * k / E), min_capacity), evaluated left to right in float64."""
    return max(math.ceil(factor * n_tokens * k / n_experts), min_capacity)


def expert_choice_capacity(n_tokens: int, n_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """C = min(max(round(cf · T / E), min_capacity), T): tokens each expert takes from a group
    of ``n_tokens`` (round half to even, as flaxformer's Python ``round``)."""
    c = max(round(capacity_factor * n_tokens / n_experts), min_capacity)
    return min(c, n_tokens)
