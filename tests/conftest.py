"""Test-wide settings: one intra-op thread (tiny shapes; OpenMP threads only contend)."""

import torch

torch.set_num_threads(1)
