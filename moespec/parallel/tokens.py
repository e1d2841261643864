"""``TokenGroup``: the ranks whose tokens form one batch for a layer's losses and statistics.

Legend: T tokens on this rank, G tokens over the group.

A layer whose losses and statistics run over several ranks' tokens (expert parallelism's
``ep`` group, or every rank of the mesh for ``scope: global``) calls these steps on its
``_stats`` group from its graph (``moespec.lower.fx.lower_layer(..., stats=...)``):

- ``token_sizes``: every rank's T (an all-gather; host sync);
- ``gather_aux``: the loss-and-statistics inputs of every rank concatenated in rank order, so
  the auxiliary losses and routing statistics are those of one process on all G tokens; each
  rank's tokens get their gradient on their own rank;
- ``total``: a host integer summed over the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moespec.parallel.comm import exchange_sizes, gather_tokens


@dataclass
class TokenGroup:
    """A process group seen from one of its ranks."""

    group: dist.ProcessGroup
    rank: int
    world: int

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> TokenGroup:
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def token_sizes(self, x_TD: Tensor) -> list[int]:
        """T of every rank, in rank order (host ints)."""
        local = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
        return [row[0] for row in exchange_sizes(local, self.group)]

    def total(self, n: int, like: Tensor) -> int:
        """The sum of ``n`` over the ranks (host int; Soft MoE's slot rows); ``like`` gives the
        device the exchange runs on."""
        local = torch.tensor([n], dtype=torch.int64, device=like.device)
        return sum(row[0] for row in exchange_sizes(local, self.group))

    def gather_aux(self, sizes: list[int], *args: object) -> tuple[object, ...]:
        """The aux module's inputs over all G tokens: per-token tensors ([T, ...], 2-D or more)
        concatenated in rank order, a router's 0-dim extra loss (a mean over tokens) as the
        token-weighted mean over ranks, anything else (absent-tensor placeholders, seq_len) as
        is. Per-token tensors travel packed by dtype (integer and bool ones as int64): one
        all-gather per dtype."""
        out: list[object] = list(args)
        buckets: dict[torch.dtype, list[int]] = {}
        for i, arg in enumerate(args):
            if not isinstance(arg, Tensor) or arg.dim() == 1:
                continue
            if arg.dim() == 0:
                part = (arg * sizes[self.rank]).reshape(1)
                total = gather_tokens(part, [1] * self.world, self.rank, self.group).sum()
                out[i] = total / max(sum(sizes), 1)
            else:
                wire = arg.dtype if arg.is_floating_point() else torch.int64
                buckets.setdefault(wire, []).append(i)
        for wire, members in buckets.items():
            cols = [args[i].to(wire).reshape(args[i].shape[0], math.prod(args[i].shape[1:])) for i in members]
            packed = gather_tokens(torch.cat(cols, 1), sizes, self.rank, self.group)
            for i, part in zip(members, packed.split([c.shape[1] for c in cols], 1), strict=True):
                out[i] = part.reshape(-1, *args[i].shape[1:]).to(args[i].dtype)
        return tuple(out)
