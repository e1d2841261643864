"""Test-wide settings and helpers: one intra-op thread (tiny shapes; OpenMP threads only
contend), and ``move_away_from_init`` (fixture of the same name) for module-vs-reference
comparisons that must not only hold at a layer's initial weights."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from moespec.spec.routers.cosine import MIN_TEMPERATURE

torch.set_num_threads(1)

# Learnable log-temperatures are clamped at log(MIN_TEMPERATURE); init never reaches it.
BELOW_FLOOR = math.log(MIN_TEMPERATURE) - 1.0


@torch.no_grad()
def move_away_from_init(module: torch.nn.Module) -> None:
    """Move every floating parameter and buffer of ``module`` (in place) to values its
    initialisation never produces, deterministically (the noise is seeded by the name):

        log_temperature           -> log(MIN_TEMPERATURE) - 1   (below the clamp floor)
        all entries > 0 (scales)  -> p · exp(0.5 n)              (stays positive)
        otherwise                 -> p + 0.5 · max(rms(p), 0.1) · n   (zero-init biases move too)

    with n ~ N(0, 1). Integer state (hash tables) is left alone."""
    for name, p in [*module.named_parameters(), *module.named_buffers()]:
        if not p.is_floating_point() or p.numel() == 0:
            continue
        if name.endswith("log_temperature"):
            p.fill_(BELOW_FLOOR)
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        n = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if bool((p > 0).all()):
            p.mul_(torch.exp(0.5 * n))
        else:
            rms = float(p.double().pow(2).mean().sqrt())
            p.add_(0.5 * max(rms, 0.1) * n)


@pytest.fixture(name="move_away_from_init")
def _move_away_from_init():
    return move_away_from_init
