"""Capacity (token dropping) and auxiliary losses."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moespec.spec.base import KindRegistry, Strict

CAPACITIES = KindRegistry("capacity")
BALANCE_LOSSES = KindRegistry("load-balance loss")


@CAPACITIES.register
class Dropless(Strict):
    """Every routed token is computed (MegaBlocks, Mixtral, DeepSeek)."""

    kind: Literal["dropless"] = Field(description="No capacity limit.")


@CAPACITIES.register
class CapacityFactor(Strict):
    """Capacity per expert C = max(ceil(factor · T · k / E), min_capacity); overflow is dropped
    (the token keeps only its residual/shared path for that expert)."""

    kind: Literal["factor"] = Field(description="Capacity from a factor.")
    train_factor: float = Field(gt=0, description="Capacity factor while training.")
    eval_factor: float = Field(gt=0, description="Capacity factor in eval mode.")
    min_capacity: int = Field(4, ge=0, description="Lower bound on C.")
    drop_policy: Literal["position", "score", "batch_priority", "random"] = Field(
        "position",
        description="Which (token, expert) slots an overflowing expert keeps. `position`: every "
        "token's first choice before any second choice, earliest token first (GShard). `score`: "
        "each slot ranked by its own routing weight, highest first, so one token's second choice can "
        "displace another token's first choice. `batch_priority`: V-MoE's Batch Priority Routing "
        "(Riquelme et al. 2021): tokens ordered by their largest routing weight (the combine weight "
        "moespec applies; V-MoE's top-1 gate when weights are not renormalised), every token's first "
        "choice served before any second choice, in that token order (ties by position). `random`: "
        "a uniformly random order. `score` and `batch_priority` agree at k = 1.",
    )


Scope = Literal["batch", "sequence", "global"]
SCOPE_DESCRIPTION = (
    "Which tokens the statistics (f, P, importance, load) come from. `batch`: the tokens of this "
    "call (the micro-batch; under expert parallelism every rank of the `ep` group, one routing "
    "batch). `sequence`: each sequence of a [batch, seq, d] input on its own, then the mean over "
    "sequences (DeepSeek-V3's sequence-wise loss). `global`: every token of this call on every "
    "rank of the mesh given to `moespec.parallelize` (`dp` and `ep`), the global-batch balance of "
    "Qiu et al. 2025 (Megatron's global aux loss): the value and gradients equal one process "
    "running all ranks' tokens, whatever the data-parallel size. Under gradient accumulation each "
    "micro-batch's loss uses that micro-batch's statistics (docs/training.md)."
)


class _WeightedLoss(Strict):
    weight: float = Field(gt=0, description="Coefficient of the loss in `aux_loss`.")
    scope: Scope = Field("batch", description=SCOPE_DESCRIPTION)


@BALANCE_LOSSES.register
class SwitchLoss(_WeightedLoss):
    """Switch load-balancing loss: E · sum_e f_e · P_e, f from the top-k mask / k (with
    sigmoid scores P is the mean of the renormalised scores s', DeepSeek-V3's
    sequence-wise balance loss with `scope: sequence`)."""

    kind: Literal["switch"] = Field(description="Switch Transformer LBL.")
    count: Literal["selection", "unbiased_topk"] = Field(
        "selection",
        description="What f_e counts. `selection` (the default): the experts each token was "
        "actually routed to, expert bias and group limit included, so the loss penalises the load "
        "the experts really get (every moespec balance loss counts this way; capacity drops are not "
        "subtracted). `unbiased_topk`: DeepSeek-V3's eq. 17-20 as written, the top-k of the unbiased "
        "scores over all experts, ignoring the expert bias and the group limit (Megatron's loss "
        "re-runs a plain top-k too). They differ only where the selection is not the plain top-k "
        "of the scores (expert bias, groups, GShard's second-expert policies); `unbiased_topk` "
        "needs a `topk` router.",
    )


@BALANCE_LOSSES.register
class GShardLoss(_WeightedLoss):
    """GShard loss: E² · mean_e(me_e · ce_e) with ce from the top-1 choice only."""

    kind: Literal["gshard"] = Field(description="GShard LBL (top-1 mask).")


@BALANCE_LOSSES.register
class ParameterPenaltyLoss(_WeightedLoss):
    """HMoE parameter penalty (Wang et al. 2024, arXiv:2408.10681): the Switch loss with each
    expert's routed fraction scaled by its relative size, E · sum_e f_e · (|θ_e| / mean |θ|) · P_e,
    so routing mass to large experts costs more and small experts are preferred."""

    kind: Literal["parameter_penalty"] = Field(description="HMoE P-Penalty loss (size-weighted Switch LBL).")


@BALANCE_LOSSES.register
class ImportanceLoadLoss(Strict):
    """Sparsely-Gated MoE (Shazeer et al. 2017): w_imp·CV(importance)² + w_load·CV(load)², with
    the smooth load estimator: an expert's load is the sum over tokens of P(its noisy logit stays
    in the top-k), the normal CDF of the margin over the noise std. It needs router noise (a topk
    router's `noise`, learned or fixed; a cosine router has none), and a spec without it is
    rejected: the estimator is what gives the load term a gradient. The released code falls back
    to a hard count of the tokens sent to each expert when the gate has no noise; that count has
    no gradient, so moespec does not offer the fallback for a noiseless router (use a Switch or
    GShard loss instead); only in eval, where no noise is drawn, is the reported loss's load the
    hard count."""

    kind: Literal["importance_load_cv2"] = Field(
        description="Importance + load CV² (Shazeer 2017); needs router noise (smooth load estimator)."
    )
    importance_weight: float = Field(gt=0, description="Coefficient of CV(importance)².")
    load_weight: float = Field(gt=0, description="Coefficient of CV(load)².")
    scope: Scope = Field("batch", description=SCOPE_DESCRIPTION)


class ZLoss(Strict):
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)²."""

    weight: float = Field(gt=0, description="Coefficient of the z-loss.")
    scope: Literal["batch", "global"] = Field(
        "batch",
        description="The tokens the mean runs over: this call's (`batch`), or every rank's of the "
        "mesh given to `moespec.parallelize` (`global`; must match a `global` balance loss).",
    )


class LossesSpec(Strict):
    """Auxiliary losses; their weighted sum is the layer's `aux_loss`."""

    load_balance: BALANCE_LOSSES.union() | None = Field(  # type: ignore[valid-type]
        None, description="Load-balancing loss, if any."
    )
    z_loss: ZLoss | None = Field(None, description="Router z-loss, if any.")


Capacity = CAPACITIES.union()
