"""Spec dtype names -> torch dtypes (the one table every layer reads)."""

from __future__ import annotations

import torch

# Spec dtype names (moespec.spec.base.DType) -> torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
