"""Reference MoE layer: router -> capacity -> experts -> combine (+ shared experts).

    y_t = sum over kept slots (t, e) of w_te * expert_e(x_t)  +  shared(x_t)

written as a loop over experts on the central sorted representation. The layer is a pure
function: it neither updates the expert bias nor keeps state; feed
``stats.routed_per_expert`` to :func:`update_expert_bias` after a training step.

Shape legend: B sequences, S sequence length, T tokens, D d_model, E experts, K top-k,
N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.losses import aux_losses, relative_sizes_E
from moespec.common.sorted_routing import SortedRouting
from moespec.reference.capacity import CapacityResult, apply_capacity
from moespec.reference.experts import expert_forward, shared_forward
from moespec.reference.routers import RouteContext, SoftRouting, route
from moespec.reference.stats import LayerStats, layer_stats, load_ratio, router_entropy
from moespec.spec.schema import LayerSpec


def moe_layer_reference(
    x: Tensor,
    params: dict[str, Tensor],
    layer: LayerSpec,
    d_model: int,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    router_dtype: str = "fp32",
    inputs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor, LayerStats]:
    """``(y, aux_loss, stats)`` for input ``x`` of shape [..., D] (y has x's shape and dtype).

    A 3-D input [B, S, D] is B sequences of S tokens (for ``scope: sequence`` losses);
    any other shape is one sequence of T = numel / D tokens. ``params`` follows
    :mod:`moespec.ir.params`; ``router_dtype`` is ``target.router_dtype`` (the
    router's own ``dtype`` wins). Randomness (jitter, noise, GShard policies, random drops)
    comes from ``generator`` only. ``inputs`` are extra router inputs (``input_ids``), each
    flattened to [T] like x.
    """
    assert x.shape[-1] == d_model, f"expected last dim {d_model}, got {tuple(x.shape)}"
    if layer.multi_head is not None:
        kw = dict(training=training, generator=generator, router_dtype=router_dtype, inputs=inputs)
        return multi_head_reference(x, params, layer, d_model, **kw)
    x_TD = x.reshape(-1, d_model)
    seq_len = x.shape[1] if x.dim() == 3 else None
    router, experts = layer.router, layer.experts
    n_experts = experts.n_routed

    ctx = RouteContext(n_experts, training, generator, router_dtype, dict(inputs or {}), seq_len)
    routing = route(x_TD, params, router, ctx)
    if isinstance(routing, SoftRouting):
        return soft_layer(x, x_TD, params, layer, routing)
    cap = apply_capacity(routing, layer.capacity, training=training, generator=generator)
    srt = routing.to_sorted(cap.keep_TK)

    # Combine: each expert runs once on its contiguous block of rows; outputs are scaled by
    # the routing weight (cast to the activation dtype) and scattered back to their tokens.
    y_TD = torch.zeros_like(x_TD)
    offsets = srt.offsets_E1.tolist()
    for e in range(n_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue  # an expert with no tokens does no work
        tok_N = srt.token_idx_N[lo:hi]
        out_ND = expert_forward(e, x_TD[tok_N], params, experts)
        y_TD = y_TD.index_add(0, tok_N, out_ND * srt.weight_N[lo:hi, None].to(x_TD.dtype))
    if experts.shared is not None:
        y_TD = y_TD + shared_forward(x_TD, params, experts.shared)
    if routing.residual_TD is not None:
        y_TD = y_TD + routing.residual_TD.to(y_TD.dtype)  # e.g. BASE's (1 - α)·x

    score = router.score_fn
    size_E = relative_sizes_E(layer, d_model)
    aux, parts = aux_losses(routing, layer.losses, score=score, seq_len=seq_len, size_E=size_E)
    stats = layer_stats(routing, cap, srt, score, parts)
    return y_TD.reshape(x.shape), aux, stats


def multi_head_reference(
    x: Tensor, params: dict[str, Tensor], layer: LayerSpec, d_model: int, **kw
) -> tuple[Tensor, Tensor, LayerStats]:
    """Multi-head MoE (MH-MoE): x' = x W_in^T + b_in; each token's x' splits into h sub-tokens
    of width D/h (a [B, S, D] input becomes B sequences of S·h sub-tokens, so per-sequence
    losses stay per sequence); the layer without ``multi_head`` runs on the sub-tokens at
    width D/h; each token's h outputs are concatenated back and y = y' W_out^T + b_out."""
    h = layer.multi_head.heads
    x_in = torch.nn.functional.linear(x, params["multi_head.w_in"], params.get("multi_head.b_in"))
    lead = tuple(x.shape[:-1])
    sub = x_in.reshape(lead[0], lead[1] * h, d_model // h) if x.dim() == 3 else x_in.reshape(-1, d_model // h)
    inner = layer.model_copy(update={"multi_head": None})
    y_sub, aux, stats = moe_layer_reference(sub, params, inner, d_model // h, **kw)
    y = torch.nn.functional.linear(
        y_sub.reshape(*lead, d_model), params["multi_head.w_out"], params.get("multi_head.b_out")
    )
    return y, aux, stats


def soft_layer(
    x: Tensor, x_TD: Tensor, params: dict[str, Tensor], layer: LayerSpec, routing: SoftRouting
) -> tuple[Tensor, Tensor, LayerStats]:
    """Soft MoE: per routing group (a sequence of a 3-D x, else all T tokens) slots
    X~ = D^T X [E·p, D]; slot s runs expert s // p; Y = C Y~ (+ shared experts).

    D and C are cast to x's dtype for the two mixing products. No loss (aux 0). Stats count
    slot rows: every expert computes G·p rows (G groups), nothing is dropped, load ratio 1,
    the entropy is that of each token's combine weights over the E·p slots. ``stats.routing``
    is the :class:`SoftRouting` itself; ``stats.sorted`` lists the slot rows expert-major
    (``token_idx_N`` indexes those rows, not tokens) and ``stats.capacity`` keeps them all.
    """
    t, d = x_TD.shape
    p, n_exp = routing.slots_per_expert, routing.n_experts
    s = n_exp * p
    seq = x.shape[1] if x.dim() == 3 else 0
    g, length = (t // seq, seq) if seq else (1, t)
    x_GLD = x_TD.reshape(g, length, d)
    disp_GLS = routing.dispatch_TS.to(x_TD.dtype).reshape(g, length, s)
    comb_GLS = routing.combine_TS.to(x_TD.dtype).reshape(g, length, s)
    slots_GSD = disp_GLS.transpose(1, 2) @ x_GLD  # each slot: a convex mix of its group's tokens
    # Expert e runs once on its p slots of every group; outputs in slot order.
    outs = []
    for e in range(n_exp):
        rows_ND = slots_GSD[:, e * p : (e + 1) * p].reshape(-1, d)
        outs.append(expert_forward(e, rows_ND, params, layer.experts).reshape(g, p, d))
    y_GLD = comb_GLS @ torch.cat(outs, dim=1)  # each token: a convex mix of all slot outputs
    y_TD = y_GLD.reshape(t, d)
    if layer.experts.shared is not None:
        y_TD = y_TD + shared_forward(x_TD, params, layer.experts.shared)

    n_rows = g * p
    long = {"dtype": torch.int64, "device": x_TD.device}
    rows_E = torch.full((n_exp,), n_rows, **long)
    row_N = torch.arange(n_exp * n_rows, **long)
    srt = SortedRouting(
        token_idx_N=row_N,
        expert_idx_N=row_N // max(n_rows, 1),
        weight_N=torch.ones(n_exp * n_rows, dtype=routing.combine_TS.dtype, device=x_TD.device),
        slot_N=torch.zeros_like(row_N),
        offsets_E1=torch.arange(n_exp + 1, **long) * n_rows,
        n_experts=n_exp,
    )
    cap = CapacityResult(torch.ones(n_exp * n_rows, 1, dtype=torch.bool), None, 0, 0.0)
    stats = LayerStats(
        routing=routing,  # type: ignore[arg-type]  (a SoftRouting: no token-choice form)
        capacity=cap,
        sorted=srt,
        tokens_per_expert=rows_E,
        routed_per_expert=rows_E.clone(),
        dropped_fraction=0.0,
        router_entropy=router_entropy(routing.combine_TS),
        load_ratio=load_ratio(rows_E),
    )
    return y_TD.reshape(x.shape), routing.logits_TS.new_zeros(()), stats
