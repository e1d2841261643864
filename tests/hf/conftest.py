"""The external oracle: transformers' own MoE blocks against the moespec layers
``moespec.hf.from_block`` makes of them (tiny random configs, fp32, nothing downloaded).

Weights are re-randomised to unit scale (``randomize``): transformers' 0.02 init makes every
routing weight and expert output tiny, which lets wrong maths pass a 1e-5 tolerance.

Shape legend: B batch, S sequence, T = B·S tokens, D d_model, E experts, K top-k.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

import moespec  # noqa: E402
import moespec.hf  # noqa: E402
from moespec.hf.registry import FAMILIES  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> None:
    """Unit-scale weights: N(0, 1/fan_in) for every floating parameter and buffer."""
    g = torch.Generator().manual_seed(seed)
    for p in [*module.parameters(), *module.buffers()]:
        if p.is_floating_point():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def eager(config: Any) -> Any:
    """The plain per-expert loop (transformers' reference forward), fp32."""
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def block_class(family: str) -> type[nn.Module]:
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(mod, FAMILIES[family].blocks[0])


def router_output(block: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
    """The block's output and what its router module returned in that call."""
    seen: list[Any] = []
    handle = getattr(
        block, FAMILIES[moespec.hf.registry.family_of_module(block)].router
    ).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        y = block(x)
    finally:
        handle.remove()
    if isinstance(y, tuple):  # GPT-OSS returns (output, router scores); the scores are checked below
        y = y[0]
    out = seen[0]
    if not isinstance(out, tuple):  # DBRX's router returns the logits; the block picks the experts
        out = (out, *block.route_tokens_to_experts(out))  # (logits, weights, experts)
    return y, out


def by_expert(idx_TK: Tensor, w_TK: Tensor) -> tuple[Tensor, Tensor]:
    """Each token's experts and weights sorted by expert index (top-k order may differ)."""
    order = idx_TK.sort(-1).indices
    return idx_TK.gather(1, order), w_TK.gather(1, order)
