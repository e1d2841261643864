"""``reduce_gradients``: the gradient step of expert parallelism for the replicated parameters.

After backward on an expert-parallel layer, a routed expert's gradient is complete on the
rank holding it (the all-to-all's backward brought every rank's rows to it), but a replicated
parameter (router, shared and zero-compute experts, multi-head projections) holds only the
part of its gradient that this rank's tokens produced. Summing those over the ``ep`` group
gives the gradient of one process on every rank's tokens (the sum of the ranks' losses).
With ``average=True`` every gradient, routed ones included, is then divided by the group
size: the gradient of the mean of the ranks' losses, as data parallelism over the same
ranks would give. Call it between ``backward()`` and the optimizer step. With FSDP2 over a
data-parallel dimension (``fully_shard(layer, mesh=mesh["dp"])`` after ``parallelize``), call it
after FSDP's gradient reduce-scatter, i.e. after ``backward()`` as well.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moespec.runtime.layer import MoELayer


def reduce_gradients(module: nn.Module, *, average: bool = False) -> None:
    """Sum (``average``: then divide by the ``ep`` size) the gradients of every expert-parallel
    moespec layer in ``module`` over its ``ep`` group, as the module docstring says."""
    for layer in module.modules():
        plan = getattr(layer, "_ep", None) if isinstance(layer, MoELayer) else None
        if plan is None:
            continue
        for name, p in layer.named_parameters():
            if p.grad is None:
                continue
            # Under FSDP2 a gradient is a DTensor sharded over the data-parallel dimension; the
            # ep peers of a rank hold the same shard of it, so the local shards are summed.
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            if not name.startswith("experts."):
                dist.all_reduce(grad, group=plan.group)
            if average:
                grad.div_(plan.world)
