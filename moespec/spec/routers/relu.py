"""ReMoE's ReLU router (`kind: relu`): a data-dependent number of experts per token."""

from __future__ import annotations

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


@ROUTERS.register
class ReLURouter(RouterSpec):
    """ReMoE: fully differentiable MoE with ReLU routing (Ziteng Wang, Jun Zhu, Jianfei Chen,
    2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing",
    arXiv:2412.14711; code thu-ml/ReMoE ``ReLURouter``).

    R = ReLU(x W_r) (input jitter optional); token t uses every expert with R_te > 0, weighted
    by R_te (no softmax, no top-k, no renormalisation), so k varies per token (0..E). Sparsity
    is steered by a load-balanced L1 term λ·E·Σ_e (Σ_t R_te / T)·(n_e / (T·k)) added to the
    aux loss, whose coefficient λ (buffer ``router.l1_coeff``) is multiplied by
    `l1_multiplier` after a training forward that was denser than the target k/E and divided
    by it otherwise. `k` only sets that target: experts per token and FLOPs are estimates.
    """

    kind: Literal["relu"] = Field(description="ReLU routing with an adaptive L1 penalty (ReMoE).")
    k: int = Field(
        gt=0,
        description="Target experts per token: the controller drives the mean density of R > 0 to "
        "k/E (the routing itself has no k). Also the k of the L1 term's load normalisation and the "
        "estimate used for active parameters and FLOPs.",
    )
    l1_coeff_init: float = Field(
        1e-8, gt=0, description="Initial L1 coefficient λ₀ (ReMoE's moe_relu_l1_reg_coeff_init)."
    )
    l1_multiplier: float = Field(
        1.2,
        gt=1,
        description="Controller step α: after each training forward λ ← λ·α if the routing was "
        "denser than k/E, else λ ← λ/α (ReMoE's moe_relu_l1_reg_coeff_multiplier).",
    )
    jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Multiplicative input jitter eps while training: x * U(1-eps, 1+eps).",
    )
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        # The target k: the realised mean is data-dependent (the controller steers it to k).
        return self.k

    def rows_per_token(self, layer: LayerSpec) -> int:
        return layer.experts.n_routed  # a token may use every expert

    def nominal_k(self, layer: LayerSpec) -> int | None:
        return self.k

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        return {
            "router.weight": RouterParam((layer.experts.n_routed, d_model)),
            "router.l1_coeff": RouterParam(
                (), "constant", buffer=True, gain=self.l1_coeff_init, controller=True
            ),
        }

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from at_most_routed(layer, at, "k", self.k)
        yield from unusable(
            layer,
            at,
            "capacity",
            "the relu router routes a variable number of experts per token; it needs capacity: dropless",
        )
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "the relu router balances load through its own load-balanced L1 term; remove losses.load_balance",
        )
