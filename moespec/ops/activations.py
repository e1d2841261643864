"""Activation functions and their derivatives, written out so backward ops need no autograd.

Legend: any shape; ``a`` is the pre-activation. ``act_backward_`` works in place (one fused
ATen pass, no allocation) for the expert backward kernels.
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


def act_backward_(name: str, grad: Tensor, a: Tensor) -> Tensor:
    """grad * act'(a) written into ``grad`` itself by ATen's fused backward kernels (one pass,
    no allocation; same values as ``grad * act_grad(name, a)`` up to rounding); returns it."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward.grad_input(grad, a, 0, grad_input=grad)
    if name == "gelu":
        return aten.gelu_backward.grad_input(grad, a, approximate="none", grad_input=grad)
    if name == "gelu_tanh":
        return aten.gelu_backward.grad_input(grad, a, approximate="tanh", grad_input=grad)
    if name == "silu":
        return aten.silu_backward.grad_input(grad, a, grad_input=grad)
    raise ValueError(f"unknown activation {name!r}")
