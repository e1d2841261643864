"""Expert-choice routing (`kind: expert_choice`): each expert picks its top-C tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterParam, RouterSpec, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class ExpertChoiceRouter(RouterSpec):
    """Expert-choice routing (Yanqi Zhou, Tao Lei, Hanxiao Liu, Nan Du, Yanping Huang, Vincent
    Zhao, Andrew Dai, Zhifeng Chen, Quoc Le, James Laudon, "Mixture-of-Experts with Expert
    Choice Routing", NeurIPS 2022, arXiv:2202.09368; flaxformer `ExpertsChooseMaskedRouter`).

    S = softmax(x W_r + b) over the experts of each token; inside each routing group of T_g
    tokens every expert e takes the C tokens with the highest S[:, e] (ties: lower token
    index first), C = min(max(round(capacity_factor · T_g / E), min_capacity), T_g) with
    round-half-to-even as in flaxformer's `int(round(...))`; token t's output is
    Σ_{e chose t} S[t, e] · f_e(x_t). A token gets 0..E experts (0: the routed part of its
    output is zero). Balanced by construction: no load-balancing loss (z-loss allowed), the
    layer's capacity must be `dropless` (the router has its own C). Each expert takes
    C ≈ capacity_factor · T_g / E tokens, so a token gets `capacity_factor` experts on
    average (experts_per_token; min_capacity and rounding ignored). Not causal: a token's
    routing depends on every token of its group, later ones included.
    """

    kind: Literal["expert_choice"] = Field(description="Expert choice: each expert picks its top-C tokens.")
    capacity_factor: float = Field(
        2.0,
        gt=0,
        description="C = round(capacity_factor · group tokens / experts): average experts per token "
        "(the paper's EC-CF2 is 2.0).",
    )
    eval_capacity_factor: float | None = Field(
        None, gt=0, description="Capacity factor in eval mode; defaults to `capacity_factor`."
    )
    min_capacity: int = Field(
        4, ge=0, description="Lower bound on C (flaxformer's min_expert_capacity); C never exceeds the group."
    )
    group_size: int | None = Field(
        None,
        gt=0,
        description="Route consecutive groups of this many tokens separately (flaxformer's group size; "
        "the sequence length gives per-sequence routing of [B, S, D] inputs); the last group may be "
        "shorter. Omitted: all tokens of a call form one group.",
    )
    bias: bool = Field(False, description="Whether the router projection has a bias.")
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")
    autoregressive: bool = Field(
        False,
        description="The layer is used in a causal (autoregressive) model. Expert choice is not "
        "causal, so `true` is an error.",
    )

    def factor(self, training: bool) -> float:
        """The capacity factor in train or eval mode."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def experts_per_token(self, layer: LayerSpec) -> float:
        # E experts × C ≈ cf·T/E tokens each = cf·T rows: cf experts per token (inference
        # factor), at most every expert.
        return min(self.factor(False), layer.experts.n_routed)

    def rows_per_token(self, layer: LayerSpec) -> int:
        # A token may be chosen by every expert.
        return layer.experts.n_routed

    def nominal_k(self, layer: LayerSpec) -> int:
        return max(1, round(self.experts_per_token(layer)))

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        n = layer.experts.n_routed
        out = {"router.weight": RouterParam((n, d_model))}
        if self.bias:
            out["router.bias"] = RouterParam((n,), "zeros")
        return out

    @property
    def causal(self) -> bool:
        # The top-C of an expert is over the whole group: later tokens change earlier choices.
        return False

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        if self.autoregressive:
            yield (
                (*at, "autoregressive"),
                "expert choice looks at every token of the group, so a token's routing depends on "
                "later tokens; not usable in a causal decoder (use a token-choice router such as "
                "`topk` there, as the paper and flaxformer do)",
            )
        yield from unusable(
            layer,
            at,
            "capacity",
            "expert choice sets its own per-expert capacity (capacity_factor, min_capacity); "
            f"the layer's capacity must be `dropless`, not `{layer.capacity.kind}`",
        )
        lb_kind = getattr(layer.losses.load_balance, "kind", None)
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            f"expert choice is balanced by construction (every expert takes C tokens); remove "
            f"the `{lb_kind}` load-balancing loss (a z-loss is fine)",
        )
