"""The collectives expert parallelism needs, with autograd: torch.distributed calls only.

- :func:`all_to_all` sends row blocks of uneven sizes to every rank
  (``dist.all_to_all_single``); its backward is the same exchange in the other direction.
- :func:`gather_tokens` concatenates every rank's [T_r, ...] tensor into [sum T_r, ...] in
  rank order (``dist.all_gather`` over rows padded to the largest T_r). Its backward returns
  the rows of this rank only, unreduced: every rank computes the same function of the
  gathered tensor (the global capacity, losses and statistics), and each rank's tokens get
  their gradient on their own rank, so gradients summed over ranks equal one process running
  the concatenation.
- :func:`exchange_sizes` all-gathers a small integer vector from every rank and brings it to
  the host: the host sync the uneven splits need.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.10 names it all_gather_single; all_gather_into_tensor is the older name.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def exchange_sizes(local_V: Tensor, group: dist.ProcessGroup) -> list[list[int]]:
    """Every rank's ``local_V`` (int64, same length on every rank), as host lists in rank order."""
    world = dist.get_world_size(group)
    out = local_V.new_empty(world * local_V.numel())
    _all_gather(out, local_V.contiguous(), group=group)
    return out.view(world, -1).tolist()  # the host sync: split sizes must be Python ints


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_ND.new_empty((sum(recv), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        grad_in = grad_out.new_empty((sum(ctx.send), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows ``x_ND`` split into blocks of ``send[j]`` rows, block j to rank j; returns the
    blocks received, ``recv[j]`` rows from rank j, in rank order. Differentiable in ``x_ND``
    (integer tensors pass through without autograd)."""
    if not x_ND.is_floating_point():
        out = x_ND.new_empty((sum(recv), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=group)
        return out
    return _AllToAll.apply(x_ND, send, recv, group)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x_T: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _gather(x_T, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad_G: Tensor) -> tuple[Tensor, None, None, None]:
        # This rank's rows only: the other ranks compute the same loss and take their own.
        return grad_G[ctx.start : ctx.stop], None, None, None


def _gather(x_T: Tensor, sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    world, longest = len(sizes), max(sizes)
    padded = x_T.new_zeros((longest, *x_T.shape[1:]))
    padded[: x_T.shape[0]] = x_T
    # all_gather_into_tensor on gloo needs a dtype it can reduce over; bools travel as uint8.
    wire = padded.to(torch.uint8) if padded.dtype == torch.bool else padded
    out = wire.new_empty((world * longest, *x_T.shape[1:]))
    _all_gather(out, wire.contiguous(), group=group)
    rows = torch.cat([out[r * longest : r * longest + n] for r, n in enumerate(sizes)])
    return rows.to(torch.bool) if x_T.dtype == torch.bool else rows


def gather_tokens(x_T: Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup) -> Tensor:
    """[sum(sizes), ...]: every rank's rows in rank order (rank r gives ``sizes[r]`` rows).
    Floating tensors keep autograd to this rank's rows (see the module docstring)."""
    if x_T.is_floating_point() and x_T.requires_grad:
        return _GatherTokens.apply(x_T, sizes, rank, group)
    return _gather(x_T, sizes, group)
