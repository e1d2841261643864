"""Reference token-choice top-k router (`kind: topk`) and the aux-loss-free bias update.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moespec.ops.reference import selection
from moespec.ops.reference._common import TORCH_DTYPES, need_generator, normal, uniform
from moespec.ops.reference.sorted_routing import SortedRouting, sort_by_expert
from moespec.spec.routers import TopKRouter


@dataclass(frozen=True)
class RoutingResult:
    """What a top-k router decided for T tokens.

    - ``logits_TE``: clean logits (x W_r^T + b) / temperature — jitter included, noise not;
      the z-loss and the smooth load estimator use these.
    - ``noisy_logits_TE``: the logits the scores came from (== ``logits_TE`` without noise).
    - ``noise_std_TE``: per-entry std of the logit noise actually added, else None.
    - ``probs_TE``: softmax or sigmoid scores over all experts (from the noisy logits).
    - ``topk_idx_TK``: chosen experts, best first (for `sampling`, the sampled one second).
    - ``topk_weight_TK``: combine weights (renormalised / softmaxed, times scaling_factor).
    - ``active_TK``: False where GShard's `random` policy dropped the second expert.
    - ``nominal_k``: the k the balance losses normalise by, when it is not ``K`` (routers
      with a data-dependent number of experts per token use the dense form K = E, see
      :func:`dense_routing`).
    - ``extra_loss``: a router-specific weighted loss added to the layer's ``aux_loss``
      (e.g. ReMoE's L1 term), or None.
    - ``residual_TD``: a [T, D] term added to the layer's output (BASE's (1 - α)·x mix),
      or None.
    """

    logits_TE: Tensor
    noisy_logits_TE: Tensor
    noise_std_TE: Tensor | None
    probs_TE: Tensor
    topk_idx_TK: Tensor
    topk_weight_TK: Tensor
    active_TK: Tensor
    n_experts: int
    nominal_k: int | None = None
    extra_loss: Tensor | None = None
    residual_TD: Tensor | None = None

    @property
    def k(self) -> int:
        """Slots per token (the nominal k of a dense-form routing)."""
        return self.nominal_k if self.nominal_k is not None else self.topk_idx_TK.shape[1]

    def selected_TE(self, keep_TK: Tensor | None = None) -> Tensor:
        """Bool [T, E]: token t routed to expert e (active slots, further masked by keep)."""
        keep = self.active_TK if keep_TK is None else keep_TK & self.active_TK
        out = torch.zeros(self.topk_idx_TK.shape[0], self.n_experts, dtype=torch.bool, device=keep.device)
        return out.scatter(1, self.topk_idx_TK, keep)

    def gates_TE(self) -> Tensor:
        """Dense combine weights [T, E] (zero off the active selection); differentiable."""
        w_TK = self.topk_weight_TK * self.active_TK.to(self.topk_weight_TK.dtype)
        out = self.topk_weight_TK.new_zeros(self.topk_idx_TK.shape[0], self.n_experts)
        return out.scatter(1, self.topk_idx_TK, w_TK)

    def tokens_per_expert(self, keep_TK: Tensor | None = None) -> Tensor:
        """int64 [E]: routed (token, expert) pairs per expert."""
        return self.selected_TE(keep_TK).sum(0)

    def to_sorted(self, keep_TK: Tensor | None = None) -> SortedRouting:
        """The central representation (rows sorted by expert, offsets[E+1]) of the active
        slots, optionally restricted to ``keep_TK`` (capacity)."""
        keep = self.active_TK if keep_TK is None else keep_TK & self.active_TK
        return sort_by_expert(self.topk_idx_TK, self.topk_weight_TK, keep, self.n_experts)


def token_choice_routing(
    logits_TE: Tensor, probs_TE: Tensor, weight_TK: Tensor, idx_TK: Tensor, n_experts: int
) -> RoutingResult:
    """A plain token-choice routing: K chosen experts per token, no noise, every slot active."""
    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=logits_TE,
        noise_std_TE=None,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TK,
        topk_weight_TK=weight_TK,
        active_TK=torch.ones_like(idx_TK, dtype=torch.bool),
        n_experts=n_experts,
    )


def dense_routing(
    logits_TE: Tensor,
    probs_TE: Tensor,
    gates_TE: Tensor,
    selected_TE: Tensor,
    *,
    nominal_k: int,
    extra_loss: Tensor | None = None,
) -> RoutingResult:
    """A routing where each token may use any number of experts, in the dense form K = E:
    slot e of token t is expert e, active where ``selected_TE``, weighing ``gates_TE``."""
    t_count, n_experts = logits_TE.shape
    idx_TE = torch.arange(n_experts, device=logits_TE.device).expand(t_count, n_experts)
    return RoutingResult(
        logits_TE=logits_TE,
        noisy_logits_TE=logits_TE,
        noise_std_TE=None,
        probs_TE=probs_TE,
        topk_idx_TK=idx_TE,
        topk_weight_TK=gates_TE,
        active_TK=selected_TE,
        n_experts=n_experts,
        nominal_k=nominal_k,
        extra_loss=extra_loss,
    )


def input_jitter(x_TD: Tensor, eps: float, *, training: bool, generator: torch.Generator | None) -> Tensor:
    """Switch input jitter while training: x * U(1 - eps, 1 + eps), one draw per entry of x
    from ``generator``; x unchanged in eval or with eps = 0."""
    if not training or eps <= 0:
        return x_TD
    u_TD = uniform(tuple(x_TD.shape), need_generator(generator, "router jitter"), x_TD)
    return x_TD * (1.0 - eps + 2.0 * eps * u_TD)


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


def update_expert_bias(bias_E: Tensor, tokens_per_expert_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing update (DeepSeek-V3): b_e += rate * sign(mean load - load_e).

    Returns the new bias (no in-place update, no gradient). Under-loaded experts go up,
    over-loaded ones down, balanced ones stay. Not mean-centred (torchtitan centres it).
    """
    load_E = tokens_per_expert_E.to(torch.float64)
    return (bias_E + rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype)).detach()
