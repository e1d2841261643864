"""Adaptive gating (`kind: adaptive_gating`): top-2, or top-1 where the router is confident."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterSpec

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class AdaptiveGatingRouter(RouterSpec):
    """Adaptive gating (Jiamin Li, Qiang Su, Yitao Yang, Yimin Jiang, Cong Wang, Hong Xu,
    2023, "Adaptive Gating in Mixture-of-Experts based Language Models", EMNLP 2023,
    arXiv:2310.07188).

    p = softmax(x W_r); each token takes its two best experts (ties to the lower index), but
    only the first when p1 − p2 > `threshold` (the router is confident). Weights: the chosen
    probabilities, normalised over the experts the token is sent to (`weights: kept`, the
    top-2 gating of fairseq/DeepSpeed the method modifies: a top-1 token gets weight 1), over
    both top-2 picks (`top2`, before the second is dropped) or raw (`raw`). A token uses 1 or 2
    experts: active parameters and FLOPs use `expected_k` (default 2, the upper bound). The
    paper's curriculum (ordering training data by token complexity) is a data-loader concern.
    """

    kind: Literal["adaptive_gating"] = Field(
        description="Top-2 gating that drops to top-1 on confident tokens."
    )
    threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="A token uses its top-1 expert only when p1 − p2 exceeds this, else its top-2.",
    )
    weights: Literal["kept", "top2", "raw"] = Field(
        "kept",
        description="Combine weights: probabilities normalised over the experts used (`kept`), over "
        "the top-2 pair even when the second is dropped (`top2`), or raw probabilities (`raw`).",
    )
    expected_k: float | None = Field(
        None,
        ge=1,
        le=2,
        description="Estimated mean experts per token (1..2) for active parameters and FLOPs; "
        "default 2 (the upper bound).",
    )
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        # An estimate: how many tokens drop to top-1 depends on the data.
        return self.expected_k if self.expected_k is not None else 2.0

    def rows_per_token(self, layer: LayerSpec) -> int:
        return 2

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        n = layer.experts.n_routed
        if n < 2:
            yield (
                (*at, "kind"),
                f"adaptive gating picks top-1 or top-2: it needs at least 2 routed experts (got {n})",
            )
