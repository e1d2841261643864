"""``moespec train``: a small trainer for the networks of specs with a `model:` section
(byte-level data generated here, AdamW + cosine, metrics, checkpoints, plots, comparisons)."""

from moespec.train.compare import compare
from moespec.train.loop import TrainConfig, lr_at, read_metrics, train

__all__ = ["TrainConfig", "compare", "lr_at", "read_metrics", "train"]
