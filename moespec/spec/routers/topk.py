"""The token-choice top-k router family (`kind: topk`) and its options."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType, Strict
from moespec.spec.routers.base import (
    NOISES,
    ROUTERS,
    ExtraInput,
    Path,
    Problem,
    RouterParam,
    RouterSpec,
    at_most_routed,
    unusable,
)

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@NOISES.register
class LearnedNoise(Strict):
    """Noisy top-k gating (Shazeer et al. 2017): while training, logits get
    eps·(softplus(x W_noise) + epsilon) with eps ~ N(0, 1); W_noise is learned."""

    kind: Literal["learned"] = Field(description="Learned softplus noise.")
    epsilon: float = Field(1e-2, ge=0, description="Floor added to the softplus noise std.")


@NOISES.register
class FixedNoise(Strict):
    """Gaussian noise of fixed std added to the logits while training (V-MoE uses 1/E)."""

    kind: Literal["fixed"] = Field(description="Fixed-std Gaussian noise.")
    std: float = Field(gt=0, description="Standard deviation of the logit noise.")


class GroupLimited(Strict):
    """Group-limited selection (DeepSeek-V2/V3): experts are split into `n_groups` equal
    groups, the best `topk_groups` groups are kept and top-k runs inside them only."""

    n_groups: int = Field(gt=0, description="Number of expert groups (must divide the expert count).")
    topk_groups: int = Field(gt=0, description="Groups kept per token.")
    group_score: Literal["top2_sum", "max"] = Field(
        "top2_sum",
        description="How a group is scored: the sum of its two best scores (DeepSeek-V3) or its "
        "best score (DeepSeek-V2).",
    )


class ExpertBias(Strict):
    """Aux-loss-free load balancing (DeepSeek-V3): a per-expert bias added to the scores for
    selection only; after each training step b_e += rate·sign(mean load − load_e)."""

    update_rate: float = Field(
        1e-3,
        ge=0,
        description="Bias update speed gamma; 0 keeps the bias frozen (transformers' DeepSeek-V3 "
        "e_score_correction_bias, a buffer nothing updates).",
    )


@ROUTERS.register
class TopKRouter(RouterSpec):
    """Token-choice top-k routing (Shazeer 2017, GShard, Switch, Mixtral, DeepSeek, Qwen).

    logits = (x W_r) / temperature; scores = softmax or sigmoid; each token picks its k best
    experts; weights are the selected scores, optionally renormalised, times `scaling_factor`.
    """

    kind: Literal["topk"] = Field(description="Token-choice top-k.")
    k: int = Field(gt=0, description="Experts per token.")
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="Score function.")
    order: Literal["softmax_then_topk", "topk_then_softmax"] = Field(
        "softmax_then_topk",
        description="softmax over all experts then top-k (Switch, Qwen, DeepSeek), or top-k of "
        "the logits then softmax over the k (Shazeer 2017, Mixtral's formulation). Softmax only.",
    )
    renormalize: bool = Field(
        False, description="Divide the k selected weights by their sum (norm_topk_prob)."
    )
    scaling_factor: float = Field(
        1.0, gt=0, description="Routed scaling factor multiplying the weights (DeepSeek-V3: 2.5)."
    )
    temperature: float = Field(1.0, gt=0, description="Logits are divided by this.")
    bias: bool = Field(False, description="Whether the router projection has a bias.")
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")
    jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Multiplicative input jitter eps while training: x * U(1-eps, 1+eps) (Switch).",
    )
    noise: NOISES.union() | None = Field(  # type: ignore[valid-type]
        None, description="Logit noise while training (none if omitted)."
    )
    groups: GroupLimited | None = Field(None, description="Group-limited selection, if any.")
    expert_bias: ExpertBias | None = Field(
        None, description="Aux-loss-free balancing bias (selection only), if any."
    )
    gating_residual: bool = Field(
        False,
        description="MoE++ gating residual: add W_res · z_prev, the previous MoE layer's router logits "
        "(`layer(x, prev_router_logits=prev.router_logits)`; zeros when not given), to the logits.",
    )
    logit_std: float | None = Field(
        None,
        gt=0,
        description="Rescale each token's logits to this standard deviation (unbiased) before the "
        "score function (MoE++ `moe_use_logits_norm`, target 1.0); none if omitted.",
    )
    trainable: bool = Field(
        True,
        description="Whether the router projection is trained; false freezes it at its random init "
        "(a buffer; SMoE-Dropout).",
    )
    second_expert_policy: Literal["all", "sampling", "random"] = Field(
        "all",
        description="GShard second-expert policy (k=2 only): `all` keeps the second best; "
        "`sampling` picks it from logits + Gumbel noise; `random` keeps it with prob 2·g2.",
    )

    def experts_per_token(self, layer: LayerSpec) -> float:
        return self.k

    @property
    def score_fn(self) -> str:
        return self.score

    @property
    def topk_of_scores(self) -> bool:
        return True

    def extra_inputs(self, layer: LayerSpec) -> tuple[ExtraInput, ...]:
        if not self.gating_residual:
            return ()
        n = layer.experts.n_routed
        return (ExtraInput("prev_router_logits", (n,), optional=True, dtype="float"),)

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        # The noise projection runs only while training; FLOPs are inference FLOPs.
        n = layer.experts.n_routed
        return d_model * n + (n * n if self.gating_residual else 0)

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        n, frozen = layer.experts.n_routed, not self.trainable
        out = {"router.weight": RouterParam((n, d_model), buffer=frozen)}
        if self.bias:
            out["router.bias"] = RouterParam((n,), "zeros", buffer=frozen)
        if self.noise is not None and self.noise.kind == "learned":
            out["router.noise_weight"] = RouterParam((n, d_model))
        if self.expert_bias is not None:
            out["router.expert_bias"] = RouterParam((n,), "zeros", buffer=True, controller=True)
        if self.gating_residual:
            # nn.Linear(E, E, bias=False)'s default bound 1/sqrt(fan_in), as MoE++'s gate_map.
            out["router.residual_weight"] = RouterParam((n, n), "uniform", buffer=frozen, gain=n**-0.5)
        return out

    def active_router_params(self, layer: LayerSpec, d_model: int) -> int:
        # W_noise is trained but only used while training: in the total, not the active count.
        # A frozen router's weights are buffers, not parameters.
        n = layer.experts.n_routed
        if not self.trainable:
            return 0
        return d_model * n + (n if self.bias else 0) + (n * n if self.gating_residual else 0)

    def schedulable(self) -> dict[str, type]:
        return {"k": int, "temperature": float}

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        r, n = self, layer.experts.n_routed
        yield from at_most_routed(layer, at, "k", r.k)
        if r.score == "sigmoid" and r.order == "topk_then_softmax":
            yield (*at, "order"), "`topk_then_softmax` needs score: softmax (sigmoid scores have no softmax)"
        if r.second_expert_policy != "all" and r.k != 2:
            yield (
                (*at, "second_expert_policy"),
                f"`{r.second_expert_policy}` is GShard's top-2 policy; it needs k=2 (got k={r.k})",
            )
        if r.groups is not None:
            g = r.groups
            if n % g.n_groups:
                yield (
                    (*at, "groups", "n_groups"),
                    f"n_groups={g.n_groups} does not divide the {n} routed experts",
                )
            elif g.group_score == "top2_sum" and n // g.n_groups < 2:
                yield (*at, "groups", "group_score"), "top2_sum needs at least 2 experts per group"
            if g.topk_groups > g.n_groups:
                yield (
                    (*at, "groups", "topk_groups"),
                    f"topk_groups={g.topk_groups} exceeds n_groups={g.n_groups}",
                )
            elif n % g.n_groups == 0 and r.k > g.topk_groups * (n // g.n_groups):
                kept = g.topk_groups * (n // g.n_groups)
                yield (*at, "k"), f"k={r.k} exceeds the {kept} experts in the {g.topk_groups} kept groups"
        if r.second_expert_policy != "all" and r.score != "softmax":
            yield (*at, "second_expert_policy"), "GShard's second-expert policies need score: softmax"
        lb = layer.losses.load_balance
        if lb is not None and lb.kind == "importance_load_cv2" and r.noise is None:
            # The smooth load estimator is P(noisy logit stays in the top-k): it needs noise std > 0.
            yield (*at, "noise"), "the importance_load_cv2 loss needs router noise (learned or fixed)"
        if r.jitter and r.noise is not None:
            yield (*at, "jitter"), "use either input jitter or logit noise, not both"
        if any(s.param == "router.k" for s in layer.schedules):
            # k(t) is compiled at k and masked down: capacity and the smooth load estimator
            # would need the step's k at trace time.
            yield from unusable(layer, at, "capacity", "a scheduled router.k needs capacity: dropless")
            if lb is not None and lb.kind == "importance_load_cv2":
                yield (
                    (*at[:-1], "losses", "load_balance"),
                    "importance_load_cv2 cannot follow a scheduled router.k",
                )
            if r.second_expert_policy != "all":
                yield (*at, "second_expert_policy"), "GShard's policies need a fixed k=2, not a scheduled k"
