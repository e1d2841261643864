"""Dynamic top-p routing (`kind: top_p`): a data-dependent number of experts per token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterSpec, at_most_routed, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class TopPRouter(RouterSpec):
    """Dynamic top-p routing (Quzhe Huang, Zhenwei An, Nan Zhuang, Mingxu Tao, Chen Zhang,
    Yang Jin, Kun Xu, Liwei Chen, Songfang Huang, Yansong Feng, 2024, "Harder Tasks Need More
    Experts: Dynamic Routing in MoE Models", arXiv:2403.07652; code ZhenweiAn/Dynamic_MoE).

    p = softmax(x W_r); experts sorted by p (ties to the lower index); a token keeps the
    smallest prefix whose cumulative probability reaches `threshold` (the expert that crosses
    it included), at most `max_k`; weights are the kept p, not renormalised (as in the
    released code) unless `renormalize`. The paper's dynamic loss, the mean router entropy
    −Σ p log p weighted by `entropy_weight`, pushes the router to concentrate (fewer experts).
    Experts per token vary (1..E): active parameters and FLOPs use `expected_k`, an estimate.
    """

    kind: Literal["top_p"] = Field(description="Dynamic top-p (cumulative threshold) routing.")
    threshold: float = Field(
        0.4,
        gt=0,
        le=1,
        description="Cumulative probability p a token's experts must reach (top_p_threshold).",
    )
    max_k: int | None = Field(
        None, gt=0, description="Cap on experts per token (none if omitted; the paper has none)."
    )
    renormalize: bool = Field(
        False, description="Divide the kept probabilities by their sum (the released code does not)."
    )
    entropy_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the dynamic loss mean_t(−Σ_e p_te log p_te) (the paper: 1e-4).",
    )
    expected_k: float | None = Field(
        None,
        gt=0,
        description="Estimated mean experts per token for active parameters, FLOPs and the balance "
        "losses' k (rounded); default max_k, or E (the upper bound) without max_k.",
    )
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        # An estimate: the realised number of experts depends on the data.
        if self.expected_k is not None:
            return self.expected_k
        return self.max_k if self.max_k is not None else layer.experts.n_routed

    def rows_per_token(self, layer: LayerSpec) -> int:
        return self.max_k if self.max_k is not None else layer.experts.n_routed

    def nominal_k(self, layer: LayerSpec) -> int | None:
        return max(1, round(self.experts_per_token(layer)))

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        n = layer.experts.n_routed
        yield from at_most_routed(layer, at, "max_k", self.max_k)
        bound = min(self.max_k or n, n)
        if self.expected_k is not None and self.expected_k > bound:
            yield (
                (*at, "expected_k"),
                f"expected_k={self.expected_k:g} exceeds the most experts a token can use ({bound})",
            )
        yield from unusable(
            layer,
            at,
            "capacity",
            "the top_p router routes a variable number of experts per token; it needs capacity: dropless",
        )
        lb = layer.losses.load_balance
        if lb is not None and lb.kind == "gshard":
            yield (
                (*at[:-1], "losses", "load_balance"),
                "the gshard loss counts each token's single top-1 choice; use `switch` with the top_p router",
            )
