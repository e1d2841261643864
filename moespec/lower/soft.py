"""FX lowering of token-mixing layers (Soft MoE): slots in, the grouped expert op, slots out.

The router's lowering returns :class:`~moespec.lower.routers.SoftNodes` (slot logits,
dispatch and combine weights over S = E·p slots, slot s feeding expert s // p). Per routing
group of L tokens (a sequence of a 3-D input, else all T tokens):

    slots_ND, token_idx_N, offsets_E1 = mix_slots(dispatch_TS, x_TD, seq_len, E)   # X̃ = Dᵀ X
    h_ND = sum over expert groups of moespec.expert_ffn(slots_ND, token_idx_N, offsets_E1, ...)
    y_TD = unmix_slots(h_ND, combine_TS, seq_len, E)                               # Y = C Ỹ

Slot rows are ordered expert-major, [E, G, p] (row n = (e·G + g)·p + j), so expert e owns
the static block offsets[e] = e·G·p .. (e+1)·G·p and the grouped op needs no sort. No token is
dropped and there is no balance loss; the statistics count the slot rows each expert computes.

Legend: T tokens, D d_model, S slots (E·p), E experts, p slots per expert, G groups, L tokens
per group, N slot rows (G·S).
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.experts import ffn_args, routed_experts
from moespec.lower.routers import SoftNodes


def groups(n_tokens: int, seq_len: int) -> tuple[int, int]:
    """``(G, L)``: T / seq_len sequences of seq_len tokens for a 3-D input (seq_len > 0),
    else one group of all T tokens."""
    return (n_tokens // seq_len, seq_len) if seq_len > 0 else (1, n_tokens)


def mix_slots(
    dispatch_TS: Tensor, x_TD: Tensor, seq_len: int, n_experts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Slot inputs X̃ = Dᵀ X per group as expert-major rows [E·G·p, D], with the identity
    ``token_idx_N`` over those rows and ``offsets_E1`` = [0, G·p, 2·G·p, ...]."""
    t, d = x_TD.shape
    s = dispatch_TS.shape[1]
    g, length = groups(t, seq_len)
    d_GLS = dispatch_TS.to(x_TD.dtype).reshape(g, length, s)
    slots_GSD = d_GLS.transpose(1, 2) @ x_TD.reshape(g, length, d)
    slots_ND = slots_GSD.reshape(g, n_experts, s // n_experts, d).transpose(0, 1).reshape(g * s, d)
    token_idx_N = torch.arange(g * s, device=x_TD.device)
    offsets_E1 = torch.arange(n_experts + 1, device=x_TD.device) * (g * (s // n_experts))
    return slots_ND, token_idx_N, offsets_E1


def unmix_slots(h_ND: Tensor, combine_TS: Tensor, seq_len: int, n_experts: int) -> Tensor:
    """Y = C Ỹ per group: slot outputs [E·G·p, D] (expert-major) back to tokens [T, D]."""
    t, s = combine_TS.shape
    d = h_ND.shape[1]
    g, length = groups(t, seq_len)
    h_GSD = h_ND.reshape(n_experts, g, s // n_experts, d).transpose(0, 1).reshape(g, s, d)
    return (combine_TS.to(h_ND.dtype).reshape(g, length, s) @ h_GSD).reshape(t, d)


def soft_stats(combine_TS: Tensor, n_rows: int, n_experts: int) -> tuple[Tensor, ...]:
    """``(aux_loss, routed_per_expert, tokens_per_expert, dropped_fraction, router_entropy,
    load_ratio)``: no loss; every expert computes its share of the ``n_rows`` slot rows (G·p
    each: nothing dropped, load ratio 1); the entropy is the mean over tokens of the combine
    distribution's (nats)."""
    c = combine_TS.detach()
    rows_E = torch.full((n_experts,), n_rows // n_experts, dtype=torch.int64, device=c.device)
    plogp = torch.where(c > 0, c * torch.log(c), torch.zeros_like(c))
    entropy = -plogp.sum(-1).mean() if c.shape[0] else c.new_zeros(())
    ratio = rows_E.max().to(c.dtype) / rows_E.min().to(c.dtype)
    return c.new_zeros(()), rows_E, rows_E.clone(), c.new_zeros(()), entropy, ratio


def n_rows(slots_ND: Tensor) -> int:
    """Slot rows of this call (static: G·S)."""
    return slots_ND.shape[0]


def lower_soft(
    b: Builder,
    layer: MoELayerNode,
    x: fx.Node,
    rt: SoftNodes,
    seq_len: fx.Node,
    plan: fx.Node | None = None,
    sizes: fx.Node | None = None,
) -> tuple[fx.Node, fx.Node]:
    """Append slots, experts and combine; returns ``(y_TD, stats)`` (stats: the tuple of
    :func:`soft_stats`, the layer's outputs after ``router_logits``). With an expert-parallel
    ``plan`` each rank mixes its own tokens into slots (its routing groups), the slot rows run
    on the experts' ranks (each row its own "token", weight 1), and the statistics count every
    rank's rows and tokens."""
    at_d, n_exp = layer.dispatch.origin, layer.experts.n_experts
    mixed = b.fn(mix_slots, rt.dispatch_TS, x, seq_len, n_exp, origin=at_d)
    slots, token_idx, offsets = (
        b.item(mixed, i, at_d, n) for i, n in enumerate(("slots_ND", "token_idx_N", "offsets_E1"))
    )
    rows, combine = b.fn(n_rows, slots, origin=at_d), rt.combine_TS
    if plan is None:
        h = routed_experts(b, layer, slots, token_idx, offsets)
    else:
        empty, at_e = b.empty_like(slots), layer.experts.origin
        group_args = tuple(
            ffn_args(b, f"experts.{gi}", grp, empty) for gi, grp in enumerate(layer.experts.groups)
        )
        ones = b.fn(torch.ones_like, token_idx, dtype=torch.float32, origin=at_d)
        h = b.item(
            b.method(plan, "experts", slots, token_idx, ones, offsets, group_args, sizes, origin=at_e),
            0,
            at_e,
        )
        rows = b.method(plan, "total", rows, slots, origin=at_d)
        combine = b.item(b.method(plan, "gather_aux", sizes, combine, origin=layer.losses.origin), 0, at_d)
    y = b.fn(unmix_slots, h, rt.combine_TS, seq_len, n_exp, origin=layer.combine.origin)
    stats = b.fn(soft_stats, combine, rows, n_exp, origin=layer.losses.origin)
    return y, stats
