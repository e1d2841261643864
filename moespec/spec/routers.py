"""Router declarations. Each router kind is one class registered in ``ROUTERS``.

Later router kinds (expert choice, Soft MoE, BASE, hash, ReLU, top-p, DSelect-k, ...) are
added as new registered classes; the layer's ``router`` field is the discriminated union of
everything registered, so the language keeps its shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moespec.spec.base import DType, KindRegistry, Strict

ROUTERS = KindRegistry("router")
NOISES = KindRegistry("noise")


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

    update_rate: float = Field(1e-3, gt=0, description="Bias update speed gamma.")


@ROUTERS.register
class TopKRouter(Strict):
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
    second_expert_policy: Literal["all", "sampling", "random"] = Field(
        "all",
        description="GShard second-expert policy (k=2 only): `all` keeps the second best; "
        "`sampling` picks it from logits + Gumbel noise; `random` keeps it with prob 2·g2.",
    )


Router = ROUTERS.union()
