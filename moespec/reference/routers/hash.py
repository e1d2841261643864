"""`kind: hash`: Hash layers (Roller et al. 2021, arXiv:2106.04426), the reference.

    idx_t = table[input_ids_t]         (router.table [vocab, k], int64, fixed)
    w_t   = 1/k on each of the k slots (1 for k = 1: the paper weighs the expert by nothing)

There are no router logits: ``logits_TE`` are zeros (the module's ``router_logits``) and
``probs_TE`` the one-hot (1/k-hot) routing, so the routing entropy statistic reads log k.
An id outside [0, vocab) fails in ``index_select`` (IndexError on CPU, a device assert on
GPU); nothing is clamped.

Shape legend: T tokens, E experts, K hashes per token, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moespec.common.routing import RoutingResult, token_choice_routing
from moespec.reference.routers import REFERENCE_ROUTERS, RouteContext, router_dtype
from moespec.spec.routers.hash import HashRouter


def input_ids(ctx: RouteContext, t_count: int) -> Tensor:
    """The layer's ``input_ids`` flattened to [T], checked (integer dtype, one per token)."""
    ids_T = ctx.inputs.get("input_ids")
    if ids_T is None:
        raise ValueError("hash routing needs the token ids: pass inputs={'input_ids': ...}")
    ids_T = ids_T.reshape(-1)
    if ids_T.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64, got {ids_T.dtype}")
    if ids_T.shape[0] != t_count:
        raise ValueError(f"input_ids has {ids_T.shape[0]} ids for {t_count} tokens")
    return ids_T


@REFERENCE_ROUTERS.register("hash")
def hash_route(x_TD: Tensor, params: dict[str, Tensor], spec: HashRouter, ctx: RouteContext) -> RoutingResult:
    """Route each token to the experts its id hashes to (see the module docstring)."""
    t_count = x_TD.shape[0]
    ids_T = input_ids(ctx, t_count)
    table_VK = params["router.table"]
    idx_TK = table_VK.index_select(0, ids_T.to(torch.int64))
    dtype = router_dtype(spec, ctx)
    weight_TK = torch.full(idx_TK.shape, 1.0 / spec.k, dtype=dtype, device=x_TD.device)
    logits_TE = torch.zeros(t_count, ctx.n_experts, dtype=dtype, device=x_TD.device)
    probs_TE = logits_TE.scatter_add(1, idx_TK, weight_TK)
    return token_choice_routing(logits_TE, probs_TE, weight_TK, idx_TK, ctx.n_experts)
