"""Lowering of `kind: hash` (Hash layers, Roller et al. 2021): a table lookup on input_ids.

logits_TE, probs_TE, weight_TK, idx_TK = hash_lookup(router.table, input_ids, E, dtype)

No parameters and no gradient reach the router: the weights are the constant 1/k.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.common.dtypes import TORCH_DTYPES
from moespec.ir.nodes import MoELayerNode
from moespec.lower import helpers
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouteNodes, RouterLowering


def hash_lookup(table_VK: Tensor, ids_T: Tensor) -> Tensor:
    """idx_TK = ``table[ids]``. Out-of-range ids raise in ``index_select`` (no host sync to
    check)."""
    if ids_T.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64, got {ids_T.dtype}")
    return table_VK.index_select(0, ids_T)


def hash_weights(idx_TK: Tensor, n_experts: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits_TE, probs_TE, weight_TK)`` of the choice ``idx_TK``: zeros, the 1/k-hot
    routing, 1/k."""
    t_count, k = idx_TK.shape
    weight_TK = torch.full((t_count, k), 1.0 / k, dtype=dtype, device=idx_TK.device)
    logits_TE = torch.zeros(t_count, n_experts, dtype=dtype, device=idx_TK.device)
    return logits_TE, logits_TE.scatter_add(1, idx_TK, weight_TK), weight_TK


@LOWERINGS.register("hash")
class HashLowering(RouterLowering):
    replay = True

    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> RouteNodes:
        at, dtype = layer.router.origin, TORCH_DTYPES[layer.router.dtype]
        idx = b.fn(hash_lookup, b.get("router.table"), inputs["input_ids"], origin=at)
        # Routing replay: the recorded experts instead of the table's (weighted 1/k as usual).
        idx = b.fn(helpers.replayed_choice, idx, inputs["replay_idx_TK"], origin=at)
        out = b.fn(hash_weights, idx, layer.experts.n_experts, dtype, origin=at)
        names = ("logits_TE", "probs_TE", "weight_TK")
        logits, probs, weight = (b.item(out, i, at, n) for i, n in enumerate(names))
        weight = b.fn(helpers.replayed_weight, weight, inputs["replay_w_TK"], origin=at)
        return RouteNodes(logits, probs, weight, idx)
