"""Example router functions for `kind: custom` (see ``CustomRouter`` in the README).

A custom router is ``fn(x_TD, weight_ED, **options)``: x [T, D], the layer's trained linear
router weight [E, D], and the spec's ``options`` as keyword arguments. It returns
``(logits_TE, weight_TK, idx_TK)`` for ``output: topk`` or ``(logits_TE, gates_TE)`` for
``output: dense``. Use it from a spec::

    router: {kind: custom, function: "moespec.examples.custom_router:softmax_topk",
             output: topk, k: 2, options: {temperature: 1.0}}
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_topk(x_TD: Tensor, weight_ED: Tensor, k: int = 2, temperature: float = 1.0):
    """Top-k of the logits, softmax over the k kept (Shazeer 2017 / Mixtral): the same math
    as `kind: topk` with ``order: topk_then_softmax``."""
    logits_TE = (x_TD @ weight_ED.T) / temperature
    top_TK, idx_TK = torch.topk(logits_TE, k, dim=-1)
    return logits_TE, top_TK.softmax(-1), idx_TK


def above_uniform(x_TD: Tensor, weight_ED: Tensor, margin: float = 1.0):
    """Dense form: every expert whose softmax probability exceeds ``margin``/E, weighted by
    that probability (a data-dependent number of experts per token, possibly none)."""
    logits_TE = x_TD @ weight_ED.T
    p_TE = logits_TE.softmax(-1)
    gates_TE = torch.where(p_TE > margin / p_TE.shape[-1], p_TE, torch.zeros_like(p_TE))
    return logits_TE, gates_TE
