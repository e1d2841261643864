"""DSelect-k (`kind: dselect_k`): k differentiable binary-code selectors, smooth-step gates."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import (
    ROUTERS,
    Path,
    Problem,
    RouterParam,
    RouterSpec,
    at_most_routed,
    unusable,
)

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec

ALPHA_INIT = 0.05
"""Selector-weight init bound: Keras ``RandomUniform()``'s default U(-0.05, 0.05), the code's."""


def n_binary(n_experts: int) -> int:
    """m = ceil(log2 E): binary variables per selector."""
    return max(1, math.ceil(math.log2(n_experts)))


@ROUTERS.register
class DSelectKRouter(RouterSpec):
    """DSelect-k (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong and Chi 2021,
    "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
    Multi-Task Learning", arXiv:2106.03760; google-research ``dselect_k_moe.py``), per token
    ("example-conditioned").

    m = ceil(log2 E) binary variables; k single-expert selectors with logits
    z_l = W_z x + b_z in R^m; smooth step S(t) = 0 (t <= -gamma/2), 1 (t >= gamma/2),
    -2t^3/gamma^3 + 3t/(2 gamma) + 1/2 between; selector l puts
    r_l(i) = prod_j (bit j of i ? S(z_lj) : 1 - S(z_lj)) on expert i (binary code, most
    significant bit first); alpha = softmax(W_a x + b_a) over the selectors; expert weights
    w_i = sum_l alpha_l r_l(i). While S has not saturated every expert has w > 0 and runs
    (dense training); once |z| >= gamma/2 each r_l is one-hot and w has at most k nonzeros,
    so "run the experts with w > 0" is the sparse inference form. Both are one lowering.

    Losses (training only, added to aux_loss): the entropy regulariser
    entropy_weight * sum_l sum_i -r_l(i) log(r_l(i) + 1e-6) that pushes the selectors to
    one-hot, and, when E is not a power of 2, reachability_weight * sum_l 1 / sum_i r_l(i)
    (selectors keep their mass on codes of real experts; at its optimum it is k; the sum is
    floored at 1e-6, where the code's would be inf with NaN gradients). Both are
    averaged over tokens here; the released code sums over the batch (its weight is then
    ours divided by the batch size). Router logits: DSelect-k has no per-expert logits; the
    layer's ``router_logits`` are the weights w. No balance loss or z-loss (the paper has
    none).
    """

    kind: Literal["dselect_k"] = Field(description="DSelect-k binary-code smooth-step selection.")
    k: int = Field(gt=0, description="Number of single-expert selectors: at most k experts per token.")
    gamma: float = Field(1.0, gt=0, description="Width of the smooth step's cubic region (paper: 1).")
    entropy_weight: float = Field(
        1e-6,
        ge=0,
        description="Weight of the selector entropy regulariser (the code's default schedule: 1e-6; 0: off).",
    )
    reachability_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of sum_l 1/sum_i r_l(i) when E is not a power of 2 (the code's: 1).",
    )
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        # Inference, once the smooth steps have saturated (training runs every expert with w > 0).
        return self.k

    def rows_per_token(self, layer: LayerSpec) -> int:
        return layer.experts.n_routed  # dense form: any expert may have w > 0

    def nominal_k(self, layer: LayerSpec) -> int | None:
        return self.k

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        # The two linear maps; the k·E·m code products are elementwise work, like a softmax.
        return d_model * self.k * (n_binary(layer.experts.n_routed) + 1)

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        km, g = self.k * n_binary(layer.experts.n_routed), self.gamma / 100
        return {
            "router.z_weight": RouterParam((km, d_model), "uniform", gain=g),
            "router.z_bias": RouterParam((km,), "uniform", gain=g),
            "router.alpha_weight": RouterParam((self.k, d_model), "uniform", gain=ALPHA_INIT),
            "router.alpha_bias": RouterParam((self.k,), "uniform", gain=ALPHA_INIT),
        }

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        n = layer.experts.n_routed
        if n < 2:
            yield (*at, "kind"), f"dselect_k needs at least 2 routed experts (got {n})"
        yield from at_most_routed(layer, at, "k", self.k)
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "dselect_k has no balance loss (its training is dense; use entropy_weight to sparsify)",
        )
        yield from unusable(layer, at, "losses.z_loss", "dselect_k has no per-expert logits; remove z_loss")
