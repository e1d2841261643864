"""Lowering of `kind: soft_moe` (the layer around it: ``moespec.lower.soft``):

logits_TS   = soft_logits(x, router.weight, router.scale)   (l2-normalised, or plain x·Φᵀ)
dispatch_TS = group_token_softmax(logits_TS, seq_len)       (over each group's tokens)
combine_TS  = softmax(logits_TS, -1)                        (over all E·p slots)

All in the router dtype. Plain torch functions (small next to the experts), shown by name in
the generated code.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from moespec.common.dtypes import TORCH_DTYPES
from moespec.ir.nodes import MoELayerNode
from moespec.lower.builder import Builder
from moespec.lower.routers import LOWERINGS, RouterLowering, SoftNodes


def soft_logits(x_TD: Tensor, phi_SD: Tensor, scale: Tensor | None) -> Tensor:
    """[T, S] slot logits: (x/|x|)·(scale·Φ/|Φ|)ᵀ with a scale, x·Φᵀ without; |v| is
    sqrt(Σv² + 1e-6) (vmoe's ``normalize``)."""
    if scale is None:
        return x_TD @ phi_SD.T
    x_hat = x_TD * torch.rsqrt(x_TD.square().sum(-1, keepdim=True) + 1e-6)
    phi_hat = phi_SD * torch.rsqrt(phi_SD.square().sum(-1, keepdim=True) + 1e-6)
    return x_hat @ (scale * phi_hat).T


def group_token_softmax(logits_TS: Tensor, seq_len: int) -> Tensor:
    """Softmax over the tokens of each group: sequences of ``seq_len`` tokens (> 0), else all."""
    t, s = logits_TS.shape
    if seq_len > 0:
        return logits_TS.reshape(-1, seq_len, s).softmax(1).reshape(t, s)
    return logits_TS.softmax(0)


@LOWERINGS.register("soft_moe")
class SoftMoELowering(RouterLowering):
    def lower(
        self, b: Builder, layer: MoELayerNode, x_TD: fx.Node, inputs: dict[str, fx.Node], training: bool
    ) -> SoftNodes:
        r, at = layer.router.config, layer.router.origin
        rdtype = TORCH_DTYPES[layer.router.dtype]
        scale = b.to(b.get("router.scale"), rdtype) if r.normalize else None
        phi = b.to(b.get("router.weight"), rdtype)
        logits = b.fn(soft_logits, b.to(x_TD, rdtype), phi, scale, origin=at)
        dispatch = b.fn(group_token_softmax, logits, inputs["seq_len"], origin=at)
        combine = b.fn(torch.softmax, logits, -1, origin=at)
        for node, name in ((logits, "logits_TS"), (dispatch, "dispatch_TS"), (combine, "combine_TS")):
            node._rename(name)  # readable gm.code
        return SoftNodes(logits, dispatch, combine)
