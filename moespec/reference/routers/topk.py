"""Reference token-choice top-k router (`kind: topk`).

Pipeline, in order (each step cites its source):
1. input jitter, training only: x * U(1-eps, 1+eps), on the router's input only (Switch /
   flaxformer; HF Mixtral also jitters the experts' input, which we do not);
2. clean logits z = (x W_r^T + b) / temperature, in the router dtype (selective precision);
3. logit noise, training only: learned H = z + eps * (softplus(x W_noise^T) + epsilon)
   (Shazeer 2017) or fixed H = z + std * eps (V-MoE); eval: H = z;
4. scores over all experts: softmax(H) or sigmoid(H);
5. selection criterion: scores (softmax_then_topk, sigmoid) or H (topk_then_softmax), plus
   the expert bias (DeepSeek-V3, selection only), restricted to the kept groups;
6. selection: top-k (ties to the lower index), or a GShard second-expert policy for k=2,
   which draws in eval mode too (fairscale/torchscale ``top2gating`` do);
7. weights from the *unbiased* values: selected scores, renormalised if asked, or softmax of
   the selected logits (topk_then_softmax); times scaling_factor.

Shape legend: T tokens, D d_model, E experts (routable, zero-compute included), K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moespec.common.dtypes import TORCH_DTYPES
from moespec.common.rng import need_generator, normal, uniform
from moespec.common.routing import RoutingResult
from moespec.reference import selection
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, input_jitter
from moespec.spec.routers import TopKRouter


def router_logits(
    x_TD: Tensor,
    w_router_ED: Tensor,
    spec: TopKRouter,
    *,
    training: bool,
    generator: torch.Generator | None,
    bias_E: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    residual_w_EE: Tensor | None = None,
    prev_logits_TE: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps 1-2: ``(x_jittered_TD, logits_TE)``, both in ``dtype``. With a gating residual
    (MoE++) the previous layer's logits enter before the temperature division:
    z = (x W_r^T + b + z_prev W_res^T) / temperature (z_prev = 0 when not given)."""
    x_TD = x_TD.to(dtype)
    x_TD = input_jitter(x_TD, spec.jitter, training=training, generator=generator)
    logits_TE = x_TD @ w_router_ED.to(dtype).T
    if bias_E is not None:
        logits_TE = logits_TE + bias_E.to(dtype)
    if residual_w_EE is not None and prev_logits_TE is not None:
        logits_TE = logits_TE + prev_logits_TE.to(dtype) @ residual_w_EE.to(dtype).T
    return x_TD, logits_TE / spec.temperature


def add_noise(
    x_TD: Tensor,
    logits_TE: Tensor,
    spec: TopKRouter,
    *,
    training: bool,
    generator: torch.Generator | None,
    noise_w_ED: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Step 3: ``(noisy_logits_TE, noise_std_TE or None)``. Noise is added after the
    temperature division and is not itself divided by it."""
    noise = spec.noise
    if not training or noise is None:
        return logits_TE, None
    gen = need_generator(generator, "router noise")
    if noise.kind == "learned":
        if noise_w_ED is None:
            raise ValueError("learned router noise needs noise_w_ED (router.noise_weight)")
        std_TE = F.softplus(x_TD @ noise_w_ED.to(logits_TE.dtype).T) + noise.epsilon
    else:
        std_TE = torch.full_like(logits_TE, noise.std)
    eps_TE = normal(tuple(logits_TE.shape), gen, logits_TE)
    return logits_TE + eps_TE * std_TE, std_TE


def route_topk(
    x_TD: Tensor,
    w_router_ED: Tensor,
    spec: TopKRouter,
    *,
    n_experts: int,
    training: bool,
    generator: torch.Generator | None = None,
    bias_E: Tensor | None = None,
    expert_bias_E: Tensor | None = None,
    noise_w_ED: Tensor | None = None,
    default_dtype: str = "fp32",
    residual_w_EE: Tensor | None = None,
    prev_logits_TE: Tensor | None = None,
) -> RoutingResult:
    """Route T tokens with a `topk` router (see the module docstring for the steps).

    ``default_dtype`` is ``target.router_dtype``, used when ``spec.dtype`` is unset. Random
    draws, in this order, all come from ``generator``: jitter [T, D], noise [T, E], Gumbel
    [T, E] (`sampling`), U [T] (`random`); it may be None when none of them happens.
    """
    assert w_router_ED.shape[0] == n_experts, "router weight must be [E, D]"
    dtype = TORCH_DTYPES[spec.dtype or default_dtype]
    x_TD, logits_TE = router_logits(
        x_TD, w_router_ED, spec, training=training, generator=generator, bias_E=bias_E, dtype=dtype,
        residual_w_EE=residual_w_EE, prev_logits_TE=prev_logits_TE,
    )  # fmt: skip
    noisy_TE, std_TE = add_noise(
        x_TD, logits_TE, spec, training=training, generator=generator, noise_w_ED=noise_w_ED
    )
    if spec.logit_std is not None:
        # MoE++ logits norm: z / (std(z) / target), unbiased std over the experts.
        noisy_TE = noisy_TE / (noisy_TE.std(-1, keepdim=True) / spec.logit_std)
    probs_TE = noisy_TE.softmax(-1) if spec.score == "softmax" else noisy_TE.sigmoid()

    # Selection criterion. Softmax is monotone, so ranking logits or probabilities picks the
    # same experts; we rank what each order's formula ranks. The expert bias shifts the
    # ranking only; weights below are taken from the unbiased values.
    crit_TE = noisy_TE if spec.order == "topk_then_softmax" else probs_TE
    if expert_bias_E is not None:
        crit_TE = crit_TE + expert_bias_E.to(dtype)
    selectable_TE = torch.ones_like(crit_TE, dtype=torch.bool)
    if spec.groups is not None:
        g = spec.groups
        selectable_TE = selection.group_limited_mask(crit_TE, g.n_groups, g.topk_groups, g.group_score)
        crit_TE = selection.mask_unselected(crit_TE, selectable_TE)

    # GShard policies draw in eval mode too, as fairscale/torchscale ``top2gating`` does
    # (only the capacity there depends on eval_mode).
    if spec.second_expert_policy == "sampling":
        # Gumbel-max over the logits samples e2 ~ softmax(H) without e1 (GShard); the expert
        # bias plays no part in the draw (it lives in score space, not logit space).
        idx_TK = selection.select_second_by_sampling(crit_TE, noisy_TE, selectable_TE, generator)
    else:
        idx_TK = selection.select_all(crit_TE, spec.k)

    if spec.order == "topk_then_softmax":
        # Shazeer 2017 / t2t: softmax over the k kept logits; already sums to 1.
        weight_TK = noisy_TE.gather(1, idx_TK).softmax(-1)
    else:
        weight_TK = probs_TE.gather(1, idx_TK)
        if spec.renormalize:
            # No epsilon in the denominator (HF DeepSeek-V3 adds 1e-20): the oracle is exact.
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)

    active_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    if spec.second_expert_policy == "random":
        # GShard Algorithm 2: keep e2 iff 2*g2 > U(0,1), with g2 the gate as configured
        # (renormalised over {e1, e2} when renormalize is set, as in the paper; the raw
        # softmax probability otherwise, as fairscale's default), before scaling_factor.
        gen = need_generator(generator, "second_expert_policy=random")
        u_T = uniform((idx_TK.shape[0],), gen, weight_TK)
        active_TK[:, 1] = 2.0 * weight_TK[:, 1].detach() > u_T

    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=noisy_TE,
        noise_std_TE=std_TE,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TK,
        topk_weight_TK=weight_TK * spec.scaling_factor,
        active_TK=active_TK,
        n_experts=n_experts,
    )


@REFERENCE_ROUTERS.register("topk")
def topk(x_TD: Tensor, params: dict[str, Tensor], spec: TopKRouter, ctx: RouteContext) -> RoutingResult:
    """Token-choice top-k routing (see ``route_topk``)."""
    return route_topk(
        x_TD,
        params["router.weight"],
        spec,
        n_experts=ctx.n_experts,
        training=ctx.training,
        generator=ctx.generator,
        bias_E=params.get("router.bias"),
        expert_bias_E=params.get("router.expert_bias") if spec.expert_bias is not None else None,
        noise_w_ED=params.get("router.noise_weight"),
        default_dtype=ctx.default_dtype,
        residual_w_EE=params.get("router.residual_weight"),
        prev_logits_TE=ctx.inputs.get("prev_router_logits"),
    )
