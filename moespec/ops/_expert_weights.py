"""One expert group's FFN weights as one value, and the expert ops' gradients.

Legend: T tokens, D d_model, F expert width, E experts in the group, N routed rows.

The expert ops (``moespec.ops.expert_ffn``) take the six weights flat, in
:class:`ExpertWeights` order, because a dispatcher schema has no structs; behind the ops the
kernels take one :class:`ExpertWeights`. An absent weight (w_gate of an mlp group, the biases
of a bias-free group) is a 0-element tensor, as custom ops have no Optional tensors.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class ExpertWeights(NamedTuple):
    """up = x W_up^T + b_up, gate = x W_gate^T + b_gate (glu), y = h W_down^T + b_down, per
    expert. The same layout holds their gradients."""

    w_up_EFD: Tensor
    w_gate_EFD: Tensor
    w_down_EDF: Tensor
    b_up_EF: Tensor
    b_gate_EF: Tensor
    b_down_ED: Tensor

    @property
    def glu(self) -> bool:
        return self.w_gate_EFD.numel() > 0

    @property
    def has_bias(self) -> bool:
        """Whether the group has biases (decided on b_up alone: :meth:`checked` holds them
        to all or none)."""
        return self.b_up_EF.numel() > 0

    def checked(self) -> ExpertWeights:
        """These weights, once the biases are known to come all or none."""
        glu = self.glu
        biases = (self.b_up_EF, self.b_gate_EF, self.b_down_ED) if glu else (self.b_up_EF, self.b_down_ED)
        present = [b.numel() > 0 for b in biases]
        if any(present) and not all(present):
            raise ValueError("expert biases come all or none: b_up, b_down" + (" and b_gate" if glu else ""))
        return self

    def present(self) -> tuple[Tensor | None, ...]:
        """The six tensors, absent ones as None (autograd's gradient of an unused input)."""
        return tuple(t if t.numel() > 0 else None for t in self)


class ExpertGrads(NamedTuple):
    """The gradients of one expert op call: the input rows', the weights' and, with the
    combine fused in, the routing weights' (``weight_N``; None without)."""

    x_TD: Tensor
    w: ExpertWeights
    weight_N: Tensor | None

    def flat(self) -> list[Tensor]:
        """The backward ops' output: [x, w_up, w_gate, w_down, b_up, b_gate, b_down(, weight_N)]."""
        return [self.x_TD, *self.w, *([] if self.weight_N is None else [self.weight_N])]

    @staticmethod
    def of(flat: list[Tensor], combine: bool) -> ExpertGrads:
        """The inverse of :meth:`flat`."""
        return ExpertGrads(flat[0], ExpertWeights(*flat[1:7]), flat[7] if combine else None)
