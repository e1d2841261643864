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
grouped GEMMs elsewhere (``moespec.ops._expert_grouped``); the ``triton_*`` ops
(``target.backend: triton``, same schemas) run generated Triton kernels
(``moespec.ops._expert_triton``). All take the weights as one
``ExpertWeights`` (``moespec.ops._expert_weights``), packed here from the ops' flat arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from moespec.ops import _expert_cpu, _expert_grouped
from moespec.ops._expert_weights import ExpertGrads, ExpertWeights

# CPU: the blocked kernels. False runs the grouped kernels on the CPU too (tests use it).
_BLOCKED_CPU = True

Kernels = Callable[[Tensor], Any]  # x_TD -> the kernels (forward, backward) that run on it


def _kernels(x_TD: Tensor) -> Any:
    return _expert_cpu if x_TD.device.type == "cpu" and _BLOCKED_CPU else _expert_grouped


class _FakeKernels:
    """The kernels' output shapes only: run by the ops' fake implementations."""

    @staticmethod
    def forward(x_TD: Tensor, token_idx_N: Tensor, offsets_E1: Tensor, first: int, w: ExpertWeights,
                activation: str, weight_N: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        n_rows, f = token_idx_N.shape[0], w.w_up_EFD.shape[1]
        y_rows = n_rows if weight_N is None else x_TD.shape[0]
        gate = x_TD.new_empty(n_rows, f) if w.glu else x_TD.new_empty(0)
        return x_TD.new_empty(y_rows, x_TD.shape[1]), x_TD.new_empty(n_rows, f), gate

    @staticmethod
    def backward(grad_y: Tensor, x_TD: Tensor, token_idx_N: Tensor, offsets_E1: Tensor, first: int,
                 w: ExpertWeights, up_NF: Tensor, gate_NF: Tensor, has_bias: bool, activation: str,
                 weight_N: Tensor | None) -> ExpertGrads:  # fmt: skip
        (e, f, d), glu = w.w_up_EFD.shape, w.glu
        b = [x_TD.new_empty(e, f), x_TD.new_empty(e, f) if glu else x_TD.new_empty(0), x_TD.new_empty(e, d)]
        grad_w = ExpertWeights(
            torch.empty_like(w.w_up_EFD),
            torch.empty_like(w.w_gate_EFD) if glu else x_TD.new_empty(0),
            torch.empty_like(w.w_down_EDF),
            *(b if has_bias else [x_TD.new_empty(0) for _ in range(3)]),
        )
        grad_weight_N = None if weight_N is None else torch.empty_like(weight_N)
        return ExpertGrads(torch.empty_like(x_TD), grad_w, grad_weight_N)


# Each op's flat signature (its schema) is written once, in a factory over the kernels: the
# real implementation runs the device's kernels, the fake one _FakeKernels.


def _expert_ffn(kernels: Kernels):
    def expert_ffn(x_TD: Tensor, token_idx_N: Tensor, offsets_E1: Tensor, first: int, w_up_EFD: Tensor,
                   w_gate_EFD: Tensor, w_down_EDF: Tensor, b_up_EF: Tensor, b_gate_EF: Tensor,
                   b_down_ED: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Grouped expert FFN over expert-sorted rows (see the module docstring)."""
        w = ExpertWeights(w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF, b_down_ED).checked()
        return kernels(x_TD).forward(x_TD, token_idx_N, offsets_E1, first, w, activation, None)

    return expert_ffn


def _expert_ffn_combine(kernels: Kernels):
    def expert_ffn_combine(x_TD: Tensor, token_idx_N: Tensor, weight_N: Tensor, offsets_E1: Tensor,
                           first: int, w_up_EFD: Tensor, w_gate_EFD: Tensor, w_down_EDF: Tensor,
                           b_up_EF: Tensor, b_gate_EF: Tensor, b_down_ED: Tensor,
                           activation: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Grouped expert FFN with the weighted combine into tokens (see the module docstring)."""
        w = ExpertWeights(w_up_EFD, w_gate_EFD, w_down_EDF, b_up_EF, b_gate_EF, b_down_ED).checked()
        return kernels(x_TD).forward(x_TD, token_idx_N, offsets_E1, first, w, activation, weight_N)

    return expert_ffn_combine


def _expert_ffn_backward(kernels: Kernels):
    def expert_ffn_backward(grad_y_ND: Tensor, x_TD: Tensor, token_idx_N: Tensor, offsets_E1: Tensor,
                            first: int, w_up_EFD: Tensor, w_gate_EFD: Tensor, w_down_EDF: Tensor,
                            up_NF: Tensor, gate_NF: Tensor, has_bias: bool,
                            activation: str) -> list[Tensor]:  # fmt: skip
        """Gradients of :func:`expert_ffn`: [x, w_up, w_gate, w_down, b_up, b_gate, b_down]
        (empty tensors for absent ones)."""
        w = _backward_weights(x_TD, w_up_EFD, w_gate_EFD, w_down_EDF, x_TD.new_empty(0))
        grads = kernels(x_TD).backward(
            grad_y_ND, x_TD, token_idx_N, offsets_E1, first, w, up_NF, gate_NF, has_bias, activation, None
        )
        return grads.flat()

    return expert_ffn_backward


def _expert_ffn_combine_backward(kernels: Kernels):
    def expert_ffn_combine_backward(grad_y_TD: Tensor, x_TD: Tensor, token_idx_N: Tensor, weight_N: Tensor,
                                    offsets_E1: Tensor, first: int, w_up_EFD: Tensor, w_gate_EFD: Tensor,
                                    w_down_EDF: Tensor, b_down_ED: Tensor, up_NF: Tensor, gate_NF: Tensor,
                                    has_bias: bool, activation: str) -> list[Tensor]:  # fmt: skip
        """Gradients of :func:`expert_ffn_combine`: [x, w_up, w_gate, w_down, b_up, b_gate,
        b_down, weight_N] (empty tensors for absent ones)."""
        w = _backward_weights(x_TD, w_up_EFD, w_gate_EFD, w_down_EDF, b_down_ED)
        grads = kernels(x_TD).backward(
            grad_y_TD, x_TD, token_idx_N, offsets_E1, first, w, up_NF, gate_NF, has_bias, activation, weight_N
        )
        return grads.flat()

    return expert_ffn_combine_backward


def _backward_weights(x_TD: Tensor, w_up_EFD: Tensor, w_gate_EFD: Tensor, w_down_EDF: Tensor,
                      b_down_ED: Tensor) -> ExpertWeights:  # fmt: skip
    """The weights the backward reads: b_down only with the combine (b_up and b_gate, never
    read, are absent; the backward ops' ``has_bias`` says whether the group has biases)."""
    return ExpertWeights(w_up_EFD, w_gate_EFD, w_down_EDF, x_TD.new_empty(0), x_TD.new_empty(0), b_down_ED)


def _define(name: str, factory: Callable[[Kernels], Callable], kernels: Kernels) -> torch.library.CustomOpDef:
    op = torch.library.custom_op(f"moespec::{name}", factory(kernels), mutates_args=())
    op.register_fake(factory(lambda _x_TD: _FakeKernels))
    return op


def _triton(_x_TD: Tensor) -> Any:
    # Imported on first use: the module needs the codegen package, not Triton itself, but the
    # torch backend has no use for it.
    from moespec.ops import _expert_triton

    return _expert_triton


expert_ffn = _define("expert_ffn", _expert_ffn, _kernels)
expert_ffn_combine = _define("expert_ffn_combine", _expert_ffn_combine, _kernels)
expert_ffn_backward = _define("expert_ffn_backward", _expert_ffn_backward, _kernels)
expert_ffn_combine_backward = _define("expert_ffn_combine_backward", _expert_ffn_combine_backward, _kernels)
# target.backend: triton. The same schemas, run by the generated Triton kernels on any device
# they support (CUDA, or the CPU under TRITON_INTERPRET=1); elsewhere a TargetError, never the
# torch kernels in their place.
triton_expert_ffn = _define("triton_expert_ffn", _expert_ffn, _triton)
triton_expert_ffn_combine = _define("triton_expert_ffn_combine", _expert_ffn_combine, _triton)
triton_expert_ffn_backward = _define("triton_expert_ffn_backward", _expert_ffn_backward, _triton)
triton_expert_ffn_combine_backward = _define(
    "triton_expert_ffn_combine_backward", _expert_ffn_combine_backward, _triton
)


def _setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor], combine: bool) -> None:
    """Save what the backward reads from the op's flat inputs (``weight_N``: the combine's)."""
    x, token_idx, *rest = inputs
    weight_N = rest.pop(0) if combine else None
    offsets, first, *weights, activation = rest
    w, (_, up, gate) = ExpertWeights(*weights), output
    ctx.save_for_backward(
        x, token_idx, weight_N, offsets, w.w_up_EFD, w.w_gate_EFD, w.w_down_EDF, w.b_down_ED, up, gate
    )
    ctx.first, ctx.activation, ctx.has_bias, ctx.n_inputs = first, activation, w.has_bias, len(inputs)
    # up/gate are outputs only to be saved: their (unused) gradients stay None instead of
    # being materialised as [N, F] zeros on every backward.
    ctx.set_materialize_grads(False)


def _backward(prefix: str, ctx, grad_y: Tensor | None, _grad_up: Tensor | None,
              _grad_gate: Tensor | None) -> tuple:  # fmt: skip
    """The gradients of the op's inputs, in their order (None: not differentiable or absent)."""
    if grad_y is None:
        return (None,) * ctx.n_inputs
    x, token_idx, weight_N, offsets, w_up, w_gate, w_down, b_down, up, gate = ctx.saved_tensors
    if weight_N is None:
        flat = getattr(torch.ops.moespec, f"{prefix}expert_ffn_backward")(
            grad_y.contiguous(), x, token_idx, offsets, ctx.first, w_up, w_gate, w_down, up, gate,
            ctx.has_bias, ctx.activation,
        )  # fmt: skip
    else:
        flat = getattr(torch.ops.moespec, f"{prefix}expert_ffn_combine_backward")(
            grad_y.contiguous(), x, token_idx, weight_N, offsets, ctx.first, w_up, w_gate, w_down, b_down, up,
            gate, ctx.has_bias, ctx.activation,
        )  # fmt: skip
    grads = ExpertGrads.of(flat, weight_N is not None)
    grad_weight = () if weight_N is None else (grads.weight_N,)
    return grads.x_TD, None, *grad_weight, None, None, *grads.w.present(), None


for _prefix, _op, _combine in (
    ("", expert_ffn, False),
    ("", expert_ffn_combine, True),
    ("triton_", triton_expert_ffn, False),
    ("triton_", triton_expert_ffn_combine, True),
):
    _op.register_autograd(
        functools.partial(_backward, _prefix), setup_context=functools.partial(_setup, combine=_combine)
    )
