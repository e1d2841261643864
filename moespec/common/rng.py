"""Explicit randomness: every draw comes from a caller's ``torch.Generator``, in fp32.

Drawing in fp32 whatever the compute dtype keeps the random stream identical across dtypes,
so the reference and the module (which draws the same samples in the same order) agree.
"""

from __future__ import annotations

import torch
from torch import Tensor


def need_generator(generator: torch.Generator | None, what: str) -> torch.Generator:
    """Return ``generator``, or fail loudly: the oracle never draws from global RNG state,
    so that two runs with equally seeded generators are bit-identical."""
    if generator is None:
        raise ValueError(f"{what} is random: pass an explicit torch.Generator")
    return generator


def uniform(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """U[0, 1) samples, drawn in fp32 (so the stream does not depend on the compute dtype),
    then cast to ``like``'s dtype and device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def normal(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """N(0, 1) samples, drawn in fp32 then cast like :func:`uniform`."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


def gumbel(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard Gumbel samples -log(-log U); U is kept inside (tiny, 1) so no sample is ±inf."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return (-torch.log(-torch.log(u))).to(device=like.device, dtype=like.dtype)
