"""Sinkhorn-balanced token-choice routing (`kind: sinkhorn`, S-BASE)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterSpec, at_most_routed, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class SinkhornRouter(RouterSpec):
    """Sinkhorn-balanced top-k routing: S-BASE (Clark, de las Casas, Guy, Mensch et al.
    2022, "Unified Scaling Laws for Routed Language Models", arXiv:2202.01169), which
    approximates BASE's balanced assignment by Sinkhorn normalisation; details as in
    Megatron-LM (`moe_router_load_balancing_type: sinkhorn`).

    logits = x W_rᵀ. Training: the selection is the top-k of each row of the Sinkhorn
    plan of exp(logits) (rows and columns alternately rescaled until the column scales
    move less than `tol` on average, at most `iterations` times), which spreads tokens
    evenly over the experts; no gradient flows through it. Eval: plain top-k of the
    scores. The combine weights are the scores (sigmoid or softmax of the logits) of the
    selected experts, not renormalised. No auxiliary loss (Megatron asserts none).
    """

    kind: Literal["sinkhorn"] = Field(description="Sinkhorn-balanced top-k (S-BASE).")
    k: int = Field(1, gt=0, description="Experts per token (S-BASE: 1).")
    score: Literal["sigmoid", "softmax"] | None = Field(
        None,
        description="Score function for the combine weights; default as Megatron: sigmoid "
        "for k=1, softmax for k>1.",
    )
    iterations: int = Field(
        100, gt=0, description="Cap on Sinkhorn iterations (Megatron loops until `tol`, uncapped)."
    )
    tol: float = Field(
        1e-4, ge=0, description="Stop when the mean change of the column scales is at most this."
    )

    @property
    def score_fn(self) -> str:
        """The score function in effect (`score`, or Megatron's k-dependent default)."""
        return self.score or ("sigmoid" if self.k == 1 else "softmax")

    def experts_per_token(self, layer: LayerSpec) -> float:
        return self.k

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from at_most_routed(layer, at, "k", self.k)
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "Sinkhorn routing balances by normalisation; it takes no load-balancing loss "
            "(as Megatron-LM requires)",
        )

    @property
    def causal(self) -> bool:
        # In training a token's selection depends on every token of the batch.
        return False
