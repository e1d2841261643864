"""Lowering of `kind: dselect_k` (DSelect-k, Hazimeh et al. 2021), dense form:

w_TE, extra_loss = dselect_k_weights(x, router.z_*, router.alpha_*, ...)
idx_TE = arange(E); selected_TE = w > 0   (moespec::sort_selected compacts the pairs)

Training and inference are the same graph: before the smooth steps saturate every expert
has w > 0 and runs; after, at most k do.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder
from moespec.lower.routers import (
    LOWERINGS,
    DenseReplay,
    RouteNodes,
    dense_slots,
    router_input,
    router_param,
)
from moespec.spec.routers.dselect_k import n_binary

ENTROPY_EPS = 1e-6  # the released code's EPSILON inside the entropy's log


def dselect_k_weights(
    x_TD: Tensor,
    z_w: Tensor,
    z_b: Tensor,
    a_w: Tensor,
    a_b: Tensor,
    k: int,
    n_experts: int,
    gamma: float,
    entropy_weight: float,
    reach_weight: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(w_TE, idx_TE, selected_TE, extra_loss)``; ``extra_loss`` is the weighted
    regulariser sum (pass zero weights for none), a 0-dim tensor."""
    m = n_binary(n_experts)
    z_TLM = F.linear(x_TD, z_w, z_b).unflatten(-1, (k, m))
    # Smooth step as clamp of the cubic's argument: the cubic is 0 at -γ/2 and 1 at γ/2 with
    # zero slope there, so S(t) = cubic(clamp(t, -γ/2, γ/2)), gradient included.
    t = z_TLM.clamp(-gamma / 2, gamma / 2)
    s_TLM = -2.0 * t**3 / gamma**3 + 1.5 * t / gamma + 0.5
    shifts_M = torch.arange(m - 1, -1, -1, device=x_TD.device)
    codes_EM = ((torch.arange(n_experts, device=x_TD.device)[:, None] >> shifts_M) & 1).bool()
    r_TLE = torch.where(codes_EM, s_TLM[:, :, None, :], 1.0 - s_TLM[:, :, None, :]).prod(-1)
    a_TL = F.linear(x_TD, a_w, a_b).softmax(-1)
    w_TE = torch.einsum("tl,tle->te", a_TL, r_TLE)
    extra = x_TD.new_zeros(())
    if entropy_weight > 0:
        extra = extra + entropy_weight * -(r_TLE * torch.log(r_TLE + ENTROPY_EPS)).sum((1, 2)).mean()
    if reach_weight > 0:
        # Clamped: a selector saturated on unreachable codes has sum 0 (the code's inf, NaN grads).
        extra = extra + reach_weight * r_TLE.sum(-1).clamp(min=ENTROPY_EPS).reciprocal().sum(-1).mean()
    return w_TE, dense_slots(w_TE), w_TE > 0, extra


@LOWERINGS.register("dselect_k")
class DSelectKLowering(DenseReplay):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        r, at = layer.router.config, layer.router.origin
        n = layer.experts.n_experts
        xr = router_input(b, layer, x_TD, inputs)
        names = ("z_weight", "z_bias", "alpha_weight", "alpha_bias")
        w = [router_param(b, layer, f"router.{name}") for name in names]
        power_of_2 = n == 2 ** n_binary(n)
        ent_w = r.entropy_weight if training else 0.0
        reach_w = r.reachability_weight if training and not power_of_2 else 0.0
        out = b.fn(dselect_k_weights, xr, *w, r.k, n, r.gamma, ent_w, reach_w, origin=at)
        w_te, idx, sel = (b.item(out, i, at, nm) for i, nm in enumerate(("w_TE", "idx_TE", "selected_TE")))
        extra = b.fn(operator.getitem, out, 3, origin=at) if ent_w > 0 or reach_w > 0 else None
        # Routing replay: the recorded experts, with the selectors' current weights for them.
        sel = b.fn(helpers.replayed_selection, sel, inputs["replay_idx_TK"], origin=at)
        gates = b.fn(helpers.replayed_gates, w_te, inputs["replay_idx_TK"], origin=at)
        gates = b.fn(helpers.replayed_weight, gates, inputs["replay_w_TK"], origin=at)
        return RouteNodes(w_te, w_te, gates, idx, sel, dense=True, extra_loss=extra)
