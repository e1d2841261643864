"""Small helpers shared by the reference ops: dtype names and explicit randomness.

Shape legend: T tokens, D d_model, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Spec dtype names (moespec.spec.base.DType) -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


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


def stable_topk(values_TE: Tensor, k: int) -> Tensor:
    """Indices [T, k] of the k largest entries of each row, best first.

    Ties go to the lower expert index (a stable descending sort), which makes the oracle
    deterministic where ``torch.topk`` leaves tie order unspecified.
    """
    order_TE = torch.sort(values_TE, dim=-1, descending=True, stable=True).indices
    return order_TE[:, :k]
