"""The shared harness on the top-k router (a smoke test of tests/routers/conftest.py)."""

from pathlib import Path

import torch

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_topk_via_harness(compare):
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    compare(str(SPECS / "debug-tiny.yaml"), (), x, training=True)
