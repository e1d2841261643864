"""Activation functions and their derivatives, written out so backward ops need no autograd.

Legend: any shape; ``a`` is the pre-activation. ``act_backward_`` works in place (one fused
ATen pass, no allocation) for the expert backward kernels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.codegen.render import glu_options

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


# The clamped GLU (GPT-OSS, DeepSeek-V4, ...). The expert ops' ``activation`` argument is
# ``FFNSpec.op_activation``: the name, then ``;limit=..;alpha=..;up_offset=..;gate_softcap=..;
# up_softcap=..`` for the options that differ from the plain GLU. With g = min(gate, limit),
# u = clamp(up, -limit, limit) and cap(v, c) = c tanh(v / c):
#     h = act'(g) * (cap(u, up_softcap) + up_offset),
#     act'(g) = cap(g, gate_softcap) sigmoid(alpha g)   (silu; plain act(g) without alpha / cap)
# The kernels call the four helpers below; for a plain name they are act, the identity, the
# identity and act_backward_, so the plain GLU pays nothing.


@dataclass(frozen=True)
class GluForm:
    """A parsed ``activation`` argument: the activation and the clamped-GLU options."""

    name: str
    limit: float | None = None
    alpha: float = 1.0
    up_offset: float = 0.0
    gate_softcap: float | None = None
    up_softcap: float | None = None

    @property
    def plain(self) -> bool:
        """True for the plain GLU (no option set)."""
        return self == GluForm(self.name)

    @property
    def silu_form(self) -> bool:
        """True when the gate's activation is written out (alpha or a gate softcap)."""
        return self.alpha != 1.0 or self.gate_softcap is not None


@functools.cache
def parse(activation: str) -> GluForm:
    """``"silu;limit=7.0;alpha=1.702;up_offset=1.0"`` -> GluForm (see the comment above)."""
    name, kw = glu_options(activation)
    return GluForm(name, **kw)


def glu_act(activation: str, gate: Tensor) -> Tensor:
    """act'(min(gate, limit)), a new tensor."""
    f = parse(activation)
    if f.plain:
        return act(f.name, gate)
    g = gate if f.limit is None else gate.clamp(max=f.limit)
    if f.silu_form:
        lin = g if f.gate_softcap is None else f.gate_softcap * torch.tanh(g / f.gate_softcap)
        return lin * torch.sigmoid(f.alpha * g)
    return act(f.name, g)


def glu_up(activation: str, up: Tensor) -> Tensor:
    """cap(clamp(up, -limit, limit), up_softcap) + up_offset (``up`` itself for the plain GLU)."""
    f = parse(activation)
    if f.limit is None and f.up_offset == 0.0 and f.up_softcap is None:
        return up
    u = up if f.limit is None else up.clamp(-f.limit, f.limit)
    if f.up_softcap is not None:
        u = f.up_softcap * torch.tanh(u / f.up_softcap)
    return u + f.up_offset


def glu_grad_up_(activation: str, grad: Tensor, up: Tensor) -> Tensor:
    """d h / d up from ``grad`` = d h / d u (in place): the softcap's derivative, zero where the
    clamp held ``up``."""
    f = parse(activation)
    if f.up_softcap is not None:
        u = up if f.limit is None else up.clamp(-f.limit, f.limit)
        t = torch.tanh(u / f.up_softcap)
        grad.mul_(1.0 - t * t)
    if f.limit is not None:
        grad.masked_fill_(up.abs() > f.limit, 0.0)
    return grad


def glu_grad_gate_(activation: str, grad: Tensor, gate: Tensor) -> Tensor:
    """grad * d act'(min(gate, limit)) / d gate, written into ``grad``; returns it."""
    f = parse(activation)
    if f.plain:
        return act_backward_(f.name, grad, gate)
    g = gate if f.limit is None else gate.clamp(max=f.limit)
    if f.silu_form:
        s = torch.sigmoid(f.alpha * g)
        if f.gate_softcap is None:
            lin, d_lin = g, 1.0
        else:
            t = torch.tanh(g / f.gate_softcap)
            lin, d_lin = f.gate_softcap * t, 1.0 - t * t
        grad.mul_(d_lin * s + lin * f.alpha * s * (1.0 - s))
    else:
        act_backward_(f.name, grad, g)
    if f.limit is not None:
        grad.masked_fill_(gate > f.limit, 0.0)
    return grad
