"""Reference ReMoE ReLU router (`kind: relu`) and its L1-coefficient controller.

Source: Wang, Zhu, Chen 2024, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
Routing" (arXiv:2412.14711) and thu-ml/ReMoE (Megatron ``ReLURouter`` and the coefficient
update in ``training.py``).

    x~    = x * U(1 - eps, 1 + eps)                     (training, jitter > 0; router input only)
    z_te  = x~_t · W_r[e]                               (router dtype, no bias)
    R_te  = ReLU(z_te);  selected_te = R_te > 0;  gate_te = R_te
    L1    = λ · E · Σ_e (Σ_t R_te / T) · (n_e / (T · k)),   n_e = #{t : R_te > 0}

L1 is the Switch load-balancing formula with probabilities R and k the *target* k (ReMoE's
``switch_load_balancing_loss_func(probs=R, topk=k)``), weighted by the current λ
(``router.l1_coeff``) and returned as the routing's ``extra_loss``; n_e carries no gradient.
Choices where this differs from the released code:
- the L1 term is part of ``aux_loss`` in eval mode too (Megatron adds it only while training
  with grad enabled), like moespec's other losses; it is λ-weighted either way;
- ``probs_TE`` (what the layer's router-entropy statistic reads) is softmax(z): R is not a
  distribution. Balance losses are rejected by the spec: L1 is ReMoE's balance term;
- the controller (:func:`update_l1_coeff`) runs after every training forward of each layer,
  from that layer's own routing (ReMoE updates once per optimizer step from the sparsity
  averaged over layers, micro-batches and data-parallel ranks).

Shape legend: T tokens, D d_model, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.controllers import update_l1_coeff
from moespec.common.routing import RoutingResult, dense_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, linear_logits
from moespec.spec.routers.relu import ReLURouter

__all__ = ["l1_balance_loss", "relu", "update_l1_coeff"]


def l1_balance_loss(r_TE: Tensor, l1_coeff: Tensor, k: int) -> Tensor:
    """λ · E · Σ_e (Σ_t R_te / T) · (n_e / (T k)); zero for T = 0."""
    t_count, n_experts = r_TE.shape
    if t_count == 0:
        return r_TE.sum() * l1_coeff.to(r_TE.dtype)
    n_E = (r_TE > 0).sum(0).to(r_TE.dtype)
    mean_r_E = r_TE.sum(0) / t_count
    return l1_coeff.to(r_TE.dtype) * n_experts * torch.sum(mean_r_E * n_E / (t_count * k))


@REFERENCE_ROUTERS.register("relu")
def relu(x_TD: Tensor, params: dict[str, Tensor], spec: ReLURouter, ctx: RouteContext) -> RoutingResult:
    """ReLU routing in the dense form (see the module docstring). Draws U [T, D] for the
    jitter (training, jitter > 0) from ``ctx.generator``."""
    _, logits_TE = linear_logits(x_TD, params, spec, ctx, jitter=spec.jitter)
    r_TE = torch.relu(logits_TE)
    selected_TE = r_TE > 0
    extra = l1_balance_loss(r_TE, params["router.l1_coeff"], spec.k)
    return dense_routing(
        logits_TE, logits_TE.softmax(-1), r_TE, selected_TE, nominal_k=spec.k, extra_loss=extra
    )
