"""BASE layers (`kind: base`): balanced linear assignment of tokens to experts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterParam, RouterSpec, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class BaseLayerRouter(RouterSpec):
    """BASE layers (Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer 2021, "BASE Layers:
    Simplifying Training of Large, Sparse Models", arXiv:2103.16716; fairseq
    `base_layer.py`).

    Affinities a = x Cᵀ with expert centroids C [E, D]. Training: the balanced linear
    assignment maximising Σ a in which every expert takes exactly T/E tokens (when E does
    not divide T, the first T mod E experts take one more), solved exactly (no gradient).
    Eval: each token goes to argmax a. The expert output is mixed by a sigmoid gate
    α = σ(x·c_e): y = α·f_e(x) + (1−α)·x, so the centroids learn through α only. No
    auxiliary loss. f_e is the spec's expert FFN (fairseq's expert is its own residual
    sublayer x + FFN(LN(x)); moespec leaves LN and that residual to the experts block and
    the surrounding model). fairseq's `base_shuffle` (a random token permutation across
    data-parallel workers) is a distributed-training detail and is not modelled.
    """

    kind: Literal["base"] = Field(description="BASE layers: balanced assignment, sigmoid-gated residual mix.")
    centroid_gain: float = Field(
        0.1, gt=0, description="Gain of the orthogonal init of the expert centroids (fairseq: 0.1)."
    )
    mix_residual: bool = Field(
        True,
        description="Add (1−α)·x to the output, as fairseq's y = α·f(x) + (1−α)·x; false keeps "
        "only α·f(x) (for a caller that adds the residual stream itself).",
    )

    def experts_per_token(self, layer: LayerSpec) -> float:
        return 1

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        shape = (layer.experts.n_routed, d_model)
        return {"router.centroids": RouterParam(shape, "orthogonal", gain=self.centroid_gain)}

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "BASE layers are balanced by construction (an exact assignment); they take no "
            "load-balancing loss",
        )

    @property
    def causal(self) -> bool:
        # In training a token's expert depends on every token of the batch.
        return False
