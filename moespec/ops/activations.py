"""Activation functions and their derivatives, written out so backward ops need no autograd.

Legend: any shape; ``a`` is the pre-activation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def act(name: str, a: Tensor) -> Tensor:
    """act(a) for relu, gelu (exact erf), gelu_tanh, silu."""
    if name == "relu":
        return torch.relu(a)
    if name == "gelu":
        return torch.nn.functional.gelu(a)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(a, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(a)
    raise ValueError(f"unknown activation {name!r}")


def act_grad(name: str, a: Tensor) -> Tensor:
    """d act(a) / da, elementwise."""
    if name == "relu":
        return (a > 0).to(a.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return cdf + a * pdf
    if name == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (a + 0.044715 * a.pow(3))
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a * a)
    if name == "silu":
        s = torch.sigmoid(a)
        return s * (1.0 + a * (1.0 - s))
    raise ValueError(f"unknown activation {name!r}")
