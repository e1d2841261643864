"""Reference expert computations: FFN/GLU blocks, routed expert groups, shared experts and
MoE++ zero-compute experts.

Weight layout (per expert group, experts stacked on dim 0; nn.Linear's [out, in] per expert):
  w_up [E, F, D], w_gate [E, F, D] (glu only), w_down [E, D, F],
  b_up [E, F], b_gate [E, F], b_down [E, D] (when ``bias``).
So y = act(x W_up^T + b_up) W_down^T + b_down (``mlp``) and
   y = (act(x W_gate^T + b_gate) * (x W_up^T + b_up)) W_down^T + b_down (``glu``).
The clamped GLU (GPT-OSS's ``_apply_gate``; ``limit``, ``alpha``, ``up_offset``; Inkling-2's
softcaps ``gate_softcap``, ``up_softcap``) is, with g = min(gate, limit), cap(v, c) = c tanh(v/c),
   h = act_alpha(g) * (cap(clamp(up, -limit, limit), up_softcap) + up_offset),
   act_alpha(g) = cap(g, gate_softcap) * sigmoid(alpha * g) (silu; alpha = 1 and no cap: SiLU).

Global expert indices follow ``experts.routed`` order (fine-grained group g with count c
and granularity m contributes c*m experts of width d_ff/m; materialised expert i*m + j is
segment j of expert i), then ``experts.zero_compute`` order.

Shape legend: N rows (tokens sent to one expert), D d_model, F ffn width, E experts, S
shared experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moespec.spec.experts import ExpertsSpec, FFNSpec, SharedExperts


def relu(x: Tensor) -> Tensor:
    """max(x, 0)."""
    return torch.clamp_min(x, 0.0)


def gelu(x: Tensor) -> Tensor:
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh-approximated GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def silu(x: Tensor) -> Tensor:
    """SiLU / swish: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": relu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "silu": silu,
}


def ffn(
    x_ND: Tensor,
    w_up_FD: Tensor,
    w_down_DF: Tensor,
    *,
    kind: str,
    activation: str,
    w_gate_FD: Tensor | None = None,
    b_up_F: Tensor | None = None,
    b_gate_F: Tensor | None = None,
    b_down_D: Tensor | None = None,
    limit: float | None = None,
    alpha: float = 1.0,
    up_offset: float = 0.0,
    gate_softcap: float | None = None,
    up_softcap: float | None = None,
) -> Tensor:
    """One FFN block on N rows: ``mlp`` act(x W_up^T + b) W_down^T + b, or ``glu``
    (act(x W_gate^T + b) * (x W_up^T + b)) W_down^T + b, clamped as the module docstring
    says when ``limit`` / ``alpha`` / ``up_offset`` are set. Returns [N, D]."""
    act = ACTIVATIONS[activation]
    if alpha != 1.0 or gate_softcap is not None:
        assert activation == "silu", "alpha and gate_softcap are SiLU's"
        c = gate_softcap
        act = lambda g: (g if c is None else c * torch.tanh(g / c)) * torch.sigmoid(alpha * g)  # noqa: E731
    up_NF = x_ND @ w_up_FD.T
    if b_up_F is not None:
        up_NF = up_NF + b_up_F
    if kind == "glu":
        assert w_gate_FD is not None, "glu needs w_gate"
        gate_NF = x_ND @ w_gate_FD.T
        if b_gate_F is not None:
            gate_NF = gate_NF + b_gate_F
        if limit is not None:
            gate_NF = torch.clamp(gate_NF, max=limit)
            up_NF = torch.clamp(up_NF, min=-limit, max=limit)
        if up_softcap is not None:
            up_NF = up_softcap * torch.tanh(up_NF / up_softcap)
        h_NF = act(gate_NF) * (up_NF + up_offset)
    else:
        h_NF = act(up_NF)
    y_ND = h_NF @ w_down_DF.T
    if b_down_D is not None:
        y_ND = y_ND + b_down_D
    return y_ND


def stacked_ffn(x_ND: Tensor, params: dict[str, Tensor], prefix: str, i: int, spec: FFNSpec) -> Tensor:
    """Expert ``i`` of the stacked FFN weights ``{prefix}.w_up`` etc. on N rows."""

    def get(name: str) -> Tensor | None:
        t = params.get(f"{prefix}.{name}")
        return None if t is None else t[i]

    return ffn(
        x_ND,
        params[f"{prefix}.w_up"][i],
        params[f"{prefix}.w_down"][i],
        kind=spec.kind,
        activation=spec.activation,
        w_gate_FD=get("w_gate"),
        b_up_F=get("b_up"),
        b_gate_F=get("b_gate"),
        b_down_D=get("b_down"),
        limit=spec.limit,
        alpha=spec.alpha,
        up_offset=spec.up_offset,
        gate_softcap=spec.gate_softcap,
        up_softcap=spec.up_softcap,
    )


def constant_expert(x_ND: Tensor, w_c_2D: Tensor, v_D: Tensor) -> Tensor:
    """MoE++ constant expert: a1 x + a2 v with [a1, a2] = softmax(x W_c^T)."""
    a_N2 = (x_ND @ w_c_2D.T).softmax(-1)
    return a_N2[:, :1] * x_ND + a_N2[:, 1:] * v_D


@dataclass(frozen=True)
class ExpertSlot:
    """Where global expert index ``start + i`` (0 <= i < stop - start) comes from:
    ``kind`` is ``ffn`` (routed group ``group``) or a zero-compute kind (list entry ``group``)."""

    start: int
    stop: int
    kind: str
    group: int


def expert_table(experts: ExpertsSpec) -> list[ExpertSlot]:
    """Global expert index ranges, in index order (routed groups, then zero-compute)."""
    table, start = [], 0
    for g, grp in enumerate(experts.routed):
        table.append(ExpertSlot(start, start + grp.n_experts, "ffn", g))
        start += grp.n_experts
    for z, zc in enumerate(experts.zero_compute):
        table.append(ExpertSlot(start, start + zc.count, zc.kind, z))
        start += zc.count
    return table


def expert_forward(e: int, x_ND: Tensor, params: dict[str, Tensor], experts: ExpertsSpec) -> Tensor:
    """Output [N, D] of global expert ``e`` on the N rows routed to it (weights not applied)."""
    for slot in expert_table(experts):
        if slot.start <= e < slot.stop:
            i = e - slot.start
            if slot.kind == "ffn":
                return stacked_ffn(x_ND, params, f"experts.{slot.group}", i, experts.routed[slot.group])
            if slot.kind == "zero":
                return torch.zeros_like(x_ND)
            if slot.kind == "copy":
                return x_ND
            pre = f"zero_compute.{slot.group}"
            return constant_expert(x_ND, params[f"{pre}.w_c"][i], params[f"{pre}.v"][i])
    raise IndexError(f"expert {e} out of range")


def shared_forward(x_TD: Tensor, params: dict[str, Tensor], shared: SharedExperts) -> Tensor:
    """Shared experts on every token: sum of ``count`` FFNs of width d_ff, times
    sigmoid(x w_gate) when ``gate`` (Qwen-MoE's shared_expert_gate, ``shared.gate`` [D]).

    With biases off this equals DeepSeek's single fused FFN of width count*d_ff; with biases
    on the down bias is added once per shared expert.
    """
    y_TD = sum(stacked_ffn(x_TD, params, "shared", s, shared) for s in range(shared.count))
    assert isinstance(y_TD, Tensor)
    if shared.gate:
        y_TD = torch.sigmoid(x_TD @ params["shared.gate"]).unsqueeze(-1) * y_TD
    return y_TD
