"""The training data of ``moespec train``: a generated text corpus, read as bytes.

The corpus is written by :func:`corpus` from a fixed seed: sentences from a small grammar
(subjects, verbs, objects, adjectives, places) mixed with lines of integer arithmetic and
counting. It is produced by this code, so it carries the project's licence and needs no
download; it has enough structure (agreement, closed word lists, sums that must be right) for
a tiny model's loss to fall visibly within minutes. The tokenizer is the identity on UTF-8
bytes (vocabulary 256), so nothing is downloaded either.

Batches are a pure function of (seed, step): :func:`batch` draws the step's window offsets
from a generator seeded by both, so a resumed run reads exactly the batches an uninterrupted
one would, whatever the checkpoint cadence.
"""

from __future__ import annotations

import random
from functools import lru_cache

import torch
from torch import Tensor

VOCAB = 256  # bytes

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team",
             "the robot", "a farmer", "the queen", "her brother", "the student"]  # fmt: skip
_VERBS = ["sees", "likes", "finds", "builds", "paints", "carries", "watches", "follows", "opens", "brings"]
_OBJECTS = ["a red box", "the river", "an apple", "the green door", "a long letter", "the map",
            "a warm coat", "the small boat", "a blue stone", "the garden"]  # fmt: skip
_PLACES = ["in the morning", "at night", "near the hill", "after lunch", "by the sea", "in the city"]
_ADVERBS = ["slowly", "quickly", "again", "together", "quietly", "happily"]


def _sentence(rng: random.Random) -> str:
    parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_ADVERBS))
    if rng.random() < 0.5:
        parts.append(rng.choice(_PLACES))
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(100), rng.randrange(100)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}."
    start = rng.randrange(50)
    return "Count: " + ", ".join(str(start + i) for i in range(rng.randrange(3, 7))) + "."


@lru_cache(maxsize=4)
def corpus(n_bytes: int = 1 << 20, seed: int = 1234) -> Tensor:
    """About ``n_bytes`` of generated text as a uint8 tensor (deterministic in ``seed``)."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(_sentence(rng) if rng.random() < 0.7 else _arithmetic(rng) for _ in range(3)) + "\n"
        lines.append(line)
        size += len(line)
    return torch.frombuffer(bytearray("".join(lines).encode()), dtype=torch.uint8).clone()


def batch(data: Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> Tensor:
    """Token ids [batch_size, seq_len] (int64) of step ``step``: windows of ``data`` at offsets
    drawn from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len)
    return data[idx].long()


def decode(ids: Tensor) -> str:
    """Bytes back to text (invalid UTF-8 replaced)."""
    return bytes(ids.flatten().tolist()).decode("utf-8", errors="replace")


def encode(text: str) -> Tensor:
    """Text as byte ids [1, len] (int64)."""
    return torch.tensor([list(text.encode())], dtype=torch.long)
