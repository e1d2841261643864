"""``moespec::expert_ffn`` and ``moespec::expert_ffn_combine``: gather rows by token, run each
expert's FFN (and weight and sum the rows per token), one fused op each.

Legend: T tokens, D d_model, F expert width, E experts in this group, N routed rows (sorted by
expert, ``offsets_E1`` global over all experts of the layer).

For the experts ``first .. first+E-1`` of one group, row n in [offsets[first],
offsets[first+E]) belongs to expert e and computes
    mlp: up = x[token_idx[n]] W_up[e]^T + b_up[e];   y = act(up) W_down[e]^T + b_down[e]
    glu: also gate = x W_gate[e]^T + b_gate[e];      y = (act(gate) * up) W_down[e]^T + b_down[e]
``expert_ffn`` returns ``(y_ND, up_NF, gate_NF)`` (rows outside the group are zero);
``expert_ffn_combine`` returns ``(y_TD, up_NF, gate_NF)`` with
    y_TD[t] = sum over the group's rows n of token t of weight_N[n] * y[n],
the combine fused in: the [N, D] rows are never an output or saved (on the CPU they live in a
reused scratch buffer, reduced per token by ``embedding_bag``; the layer graph sums this op
over expert groups). The pre-activations are saved for backward instead of recomputing two
of the three GEMMs. Absent optional tensors are passed as empty tensors
(custom ops have no Optional outputs).

Kernels: blocked per expert row block on the CPU (``moespec.ops._expert_cpu``), whole-group
grouped GEMMs elsewhere (``moespec.ops._expert_grouped``).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from moespec.ops import _expert_cpu, _expert_grouped

# CPU: the blocked kernels. False runs the grouped kernels on the CPU too (tests use it).
_BLOCKED_CPU = True


def _kernels(x_TD: Tensor) -> ModuleType:
    return _expert_cpu if x_TD.device.type == "cpu" and _BLOCKED_CPU else _expert_grouped


def _check_biases(w_gate_EFD: Tensor, b_up_EF: Tensor, b_gate_EF: Tensor, b_down_ED: Tensor) -> None:
    """The biases come all or none (the kernels and the backward decide on b_up alone)."""
    glu = w_gate_EFD.numel() > 0
    present = [b.numel() > 0 for b in ((b_up_EF, b_gate_EF, b_down_ED) if glu else (b_up_EF, b_down_ED))]
    if any(present) and not all(present):
        raise ValueError("expert biases come all or none: b_up, b_down" + (" and b_gate" if glu else ""))


@torch.library.custom_op("moespec::expert_ffn", mutates_args=())
def expert_ffn(
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    b_up_EF: Tensor,
    b_gate_EF: Tensor,
    b_down_ED: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped expert FFN over expert-sorted rows (see the module docstring)."""
    _check_biases(w_gate_EFD, b_up_EF, b_gate_EF, b_down_ED)
    return _kernels(x_TD).forward(
        x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF,
        b_down_ED, activation, None,
    )  # fmt: skip


@torch.library.custom_op("moespec::expert_ffn_combine", mutates_args=())
def expert_ffn_combine(
    x_TD: Tensor,
    token_idx_N: Tensor,
    weight_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    b_up_EF: Tensor,
    b_gate_EF: Tensor,
    b_down_ED: Tensor,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped expert FFN with the weighted combine into tokens (see the module docstring)."""
    _check_biases(w_gate_EFD, b_up_EF, b_gate_EF, b_down_ED)
    return _kernels(x_TD).forward(
        x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF,
        b_down_ED, activation, weight_N,
    )  # fmt: skip


def _fake_forward(x_TD: Tensor, token_idx_N: Tensor, w_up_EFD: Tensor, w_gate_EFD: Tensor, y_rows: int):
    n_rows, f = token_idx_N.shape[0], w_up_EFD.shape[1]
    gate = x_TD.new_empty(n_rows, f) if w_gate_EFD.numel() > 0 else x_TD.new_empty(0)
    return x_TD.new_empty(y_rows, x_TD.shape[1]), x_TD.new_empty(n_rows, f), gate


@expert_ffn.register_fake
def _(x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, *_rest):
    return _fake_forward(x_TD, token_idx_N, w_up_EFD, w_gate_EFD, token_idx_N.shape[0])


@expert_ffn_combine.register_fake
def _(x_TD, token_idx_N, weight_N, offsets_E1, first, w_up_EFD, w_gate_EFD, *_rest):
    return _fake_forward(x_TD, token_idx_N, w_up_EFD, w_gate_EFD, x_TD.shape[0])


@torch.library.custom_op("moespec::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(
    grad_y_ND: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    up_NF: Tensor,
    gate_NF: Tensor,
    has_bias: bool,
    activation: str,
) -> list[Tensor]:
    """Gradients of :func:`expert_ffn`: [x, w_up, w_gate, w_down, b_up, b_gate, b_down]
    (empty tensors for absent ones)."""
    return _kernels(x_TD).backward(
        grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF,
        x_TD.new_empty(0), up_NF, gate_NF, has_bias, activation, None,
    )  # fmt: skip


@torch.library.custom_op("moespec::expert_ffn_combine_backward", mutates_args=())
def expert_ffn_combine_backward(
    grad_y_TD: Tensor,
    x_TD: Tensor,
    token_idx_N: Tensor,
    weight_N: Tensor,
    offsets_E1: Tensor,
    first: int,
    w_up_EFD: Tensor,
    w_gate_EFD: Tensor,
    w_down_EDF: Tensor,
    b_down_ED: Tensor,
    up_NF: Tensor,
    gate_NF: Tensor,
    has_bias: bool,
    activation: str,
) -> list[Tensor]:
    """Gradients of :func:`expert_ffn_combine`: [x, w_up, w_gate, w_down, b_up, b_gate,
    b_down, weight_N] (empty tensors for absent ones)."""
    return _kernels(x_TD).backward(
        grad_y_TD, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_down_ED,
        up_NF, gate_NF, has_bias, activation, weight_N,
    )  # fmt: skip


def _fake_grads(x_TD: Tensor, w_up_EFD: Tensor, w_gate_EFD: Tensor, w_down_EDF: Tensor, has_bias: bool):
    e, f, d = w_up_EFD.shape
    glu = w_gate_EFD.numel() > 0
    b = [x_TD.new_empty(e, f), x_TD.new_empty(e, f) if glu else x_TD.new_empty(0), x_TD.new_empty(e, d)]
    return [
        torch.empty_like(x_TD),
        torch.empty_like(w_up_EFD),
        torch.empty_like(w_gate_EFD) if glu else x_TD.new_empty(0),
        torch.empty_like(w_down_EDF),
        *(b if has_bias else [x_TD.new_empty(0) for _ in range(3)]),
    ]


@expert_ffn_backward.register_fake
def _(grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, up_NF, gate_NF,
      has_bias, activation):  # fmt: skip
    return _fake_grads(x_TD, w_up_EFD, w_gate_EFD, w_down_EDF, has_bias)


@expert_ffn_combine_backward.register_fake
def _(grad_y_TD, x_TD, token_idx_N, weight_N, offsets_E1, first, w_up_EFD, w_gate_EFD, w_down_EDF, b_down_ED,
      up_NF, gate_NF, has_bias, activation):  # fmt: skip
    return [*_fake_grads(x_TD, w_up_EFD, w_gate_EFD, w_down_EDF, has_bias), torch.empty_like(weight_N)]


def _opt(t: Tensor) -> Tensor | None:
    return t if t.numel() > 0 else None


def _setup(ctx, inputs, output) -> None:
    x, token_idx, offsets, first, w_up, w_gate, w_down, b_up, _b_gate, _b_down, activation = inputs
    _, up, gate = output
    ctx.save_for_backward(x, token_idx, offsets, w_up, w_gate, w_down, up, gate)
    ctx.first, ctx.activation, ctx.has_bias = first, activation, b_up.numel() > 0
    # up/gate are outputs only to be saved: their (unused) gradients stay None instead of
    # being materialised as [N, F] zeros on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_up, _grad_gate):
    if grad_y is None:
        return (None,) * 11
    x, token_idx, offsets, w_up, w_gate, w_down, up, gate = ctx.saved_tensors
    gx, gwu, gwg, gwd, gbu, gbg, gbd = torch.ops.moespec.expert_ffn_backward(
        grad_y.contiguous(), x, token_idx, offsets, ctx.first, w_up, w_gate, w_down, up, gate,
        ctx.has_bias, ctx.activation,
    )  # fmt: skip
    return gx, None, None, None, gwu, _opt(gwg), gwd, _opt(gbu), _opt(gbg), _opt(gbd), None


def _setup_combine(ctx, inputs, output) -> None:
    x, token_idx, weight, offsets, first, w_up, w_gate, w_down, b_up, _b_gate, b_down, activation = inputs
    _, up, gate = output
    ctx.save_for_backward(x, token_idx, weight, offsets, w_up, w_gate, w_down, b_down, up, gate)
    ctx.first, ctx.activation, ctx.has_bias = first, activation, b_up.numel() > 0
    ctx.set_materialize_grads(False)


def _backward_combine(ctx, grad_y, _grad_up, _grad_gate):
    if grad_y is None:
        return (None,) * 12
    x, token_idx, weight, offsets, w_up, w_gate, w_down, b_down, up, gate = ctx.saved_tensors
    gx, gwu, gwg, gwd, gbu, gbg, gbd, gw = torch.ops.moespec.expert_ffn_combine_backward(
        grad_y.contiguous(), x, token_idx, weight, offsets, ctx.first, w_up, w_gate, w_down, b_down, up,
        gate, ctx.has_bias, ctx.activation,
    )  # fmt: skip
    return gx, None, gw, None, None, gwu, _opt(gwg), gwd, _opt(gbu), _opt(gbg), _opt(gbd), None


expert_ffn.register_autograd(_backward, setup_context=_setup)
expert_ffn_combine.register_autograd(_backward_combine, setup_context=_setup_combine)
