"""Lowering of `kind: topk`:

logits  = linear(x · jitter, router.weight) / temperature   (+ noise · std while training)
weight_TK, idx_TK, probs_TE = moespec.topk_route(logits, expert_bias, gumbel, ...)
active_TK = GShard `random` policy's keep-second mask (else all True)
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from moespec.common.dtypes import TORCH_DTYPES
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder, RandomInput
from moespec.lower.routers import (
    JITTER,
    LOWERINGS,
    RouteNodes,
    RouterLowering,
    linear_logits,
    replayed,
    router_param,
    topk_route_op,
)

OPS = torch.ops.moespec


def limit_k(
    idx_TK: Tensor,
    noisy_TE: Tensor,
    probs_TE: Tensor,
    active_TK: Tensor,
    k_t: Tensor,
    order: str,
    renormalize: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """A scheduled k: keep the first ``k_t`` of the K (best-first) slots the graph was
    compiled for and recompute the weights as a top-``k_t`` router would (the top-k_t are
    the first k_t of the sorted top-K): softmax over the kept logits, or the kept scores
    renormalised, or the scores as they are."""
    keep_1K = (torch.arange(idx_TK.shape[1], device=idx_TK.device) < k_t).unsqueeze(0)
    weight_TK = helpers.topk_weights(idx_TK, noisy_TE, probs_TE, order, renormalize, scale, keep_1K)
    return weight_TK, active_TK & keep_1K


@LOWERINGS.register("topk")
class TopKLowering(RouterLowering):
    replay = True

    def random_inputs(self, layer: MoELayerNode, training: bool) -> list[RandomInput]:
        r, out = layer.router.config, []
        if training and r.jitter > 0:
            out.append(JITTER)
        if training and r.noise is not None:
            out.append(RandomInput("noise_TE", "normal", "TE", True))
        if r.second_expert_policy == "sampling":
            out.append(RandomInput("gumbel_TE", "gumbel", "TE", False))
        if r.second_expert_policy == "random":
            out.append(RandomInput("second_u_T", "uniform", "T", False))
        return out

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        rdtype = TORCH_DTYPES[layer.router.dtype]
        # Router in the router dtype (selective precision), jitter/noise while training.
        xr, logits = linear_logits(b, layer, x_TD, inputs, bias="router.bias" if r.bias else None)
        if r.gating_residual:  # MoE++: + z_prev W_res^T (z_prev zeros for a stack's first layer)
            z_prev = b.to(inputs["prev_router_logits"], rdtype)
            res = b.fn(F.linear, z_prev, router_param(b, layer, "router.residual_weight"), origin=at)
            logits = b.fn(operator.add, logits, res, origin=at)
        if "router.temperature" in inputs:  # scheduled: a 0-dim tensor (keeps the logits' dtype)
            logits = b.fn(operator.truediv, logits, inputs["router.temperature"], origin=at)
        elif r.temperature != 1.0:
            logits = b.fn(operator.truediv, logits, r.temperature, origin=at)
        noisy, std = logits, b.empty_like(logits)
        if "noise_TE" in inputs:
            if r.noise.kind == "learned":
                w_n = router_param(b, layer, "router.noise_weight")
                sp = b.fn(F.softplus, b.fn(F.linear, xr, w_n, origin=at), origin=at)
                std = b.fn(operator.add, sp, r.noise.epsilon, origin=at)
            else:
                std = b.fn(torch.full_like, logits, r.noise.std, origin=at)
            eps_std = b.fn(operator.mul, inputs["noise_TE"], std, origin=at)
            noisy = b.fn(operator.add, logits, eps_std, origin=at)
        if r.logit_std is not None:
            noisy = b.fn(helpers.rescale_std, noisy, r.logit_std, origin=at)
        empty_r = b.empty_like(logits)
        expert_bias = b.get("router.expert_bias") if r.expert_bias is not None else empty_r
        groups = r.groups
        route = b.fn(
            topk_route_op(layer, sampling="gumbel_TE" in inputs),
            noisy,
            expert_bias,
            inputs.get("gumbel_TE", empty_r),
            r.k,
            r.score,
            r.order,
            r.renormalize,
            r.scaling_factor,
            groups.n_groups if groups else 0,
            groups.topk_groups if groups else 0,
            groups.group_score if groups else "max",
            origin=at,
        )
        weight, idx, probs = (
            b.item(route, i, at, n) for i, n in enumerate(("weight_TK", "idx_TK", "probs_TE"))
        )
        # Routing replay: the recorded experts instead of the router's own choice.
        weight, idx = replayed(b, layer, (weight, idx, probs), noisy, inputs, r.order, r.renormalize,
                               r.scaling_factor)  # fmt: skip
        if "second_u_T" in inputs:
            u = inputs["second_u_T"]
            active = b.fn(helpers.gshard_keep_second, weight, u, r.scaling_factor, origin=at)
        else:
            active = b.fn(torch.ones_like, idx, dtype=torch.bool, origin=at)
        k_t = inputs.get("router.k")
        if k_t is not None:
            limited = b.fn(limit_k, idx, noisy, probs, active, k_t, r.order, r.renormalize,
                           r.scaling_factor, origin=at)  # fmt: skip
            weight, active = b.item(limited, 0, at, "weight_TK"), b.item(limited, 1, at, "active_TK")
        return RouteNodes(logits, probs, weight, idx, active, noisy_TE=noisy, std_TE=std, k_active=k_t)

    def after_forward(self, module: nn.Module, stats: dict[str, Tensor]) -> None:
        cfg = module.ir.router.config.expert_bias
        if cfg is None:
            return
        # Aux-loss-free balancing (DeepSeek-V3): b_e += rate * sign(mean load - load_e).
        bias_E = module.router.expert_bias
        load_E = stats["routed_per_expert"].to(bias_E.dtype)
        bias_E.add_(cfg.update_rate * torch.sign(load_E.mean() - load_E))
