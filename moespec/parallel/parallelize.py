"""``moespec.parallelize(module, mesh)``: expert parallelism for every moespec layer in a module.

Each rank builds the same layer (same seed), then keeps only its experts: the routed experts'
weights of expert group g become this rank's rows of the group, in ascending expert index.
Where those rows are the rank's ``Shard(0)`` chunk of the group (the default ``contiguous``
mapping whenever the group splits evenly), the parameter is a ``DTensor`` sharded on the
expert dimension over the mesh's ``ep`` dimension; under other mappings it is a plain local
tensor of this rank's experts. Router, shared and zero-compute experts stay replicated.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moespec.errors import TargetError
from moespec.parallel.checkpoint import install_hooks
from moespec.parallel.plan import EPPlan
from moespec.runtime.layer import MoELayer
from moespec.runtime.target import EP_RANKS_ATTR

EP_DIM = "ep"
# A routed expert group's parameters (``experts.{g}.{name}``), each [E_g, ...].
WEIGHT_NAMES = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")


def parallelize(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Spread the routed experts of every moespec layer in ``module`` (``module`` itself
    included) over the ``ep`` dimension of ``mesh``, in place; returns ``module``.

    Every rank must have built the layers identically (same spec and seed). Afterwards each
    rank calls the module on its own tokens; the routed experts run where they live
    (all-to-all), and capacity, auxiliary losses and routing statistics are those of one
    process running the concatenation of every rank's tokens (in rank order).
    """
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise TypeError(f"moespec.parallelize: {type(module).__name__} holds no moespec layer")
    ep_mesh = _ep_mesh(mesh)
    for layer in layers:
        _parallelize_layer(layer, ep_mesh)
    return module


def _ep_mesh(mesh: DeviceMesh) -> DeviceMesh:
    names = mesh.mesh_dim_names or ()
    if EP_DIM not in names:
        raise TargetError(
            "placement.expert_parallel",
            f"the mesh has no {EP_DIM!r} dimension (its dimensions: {list(names) or 'unnamed'}); "
            "make one with init_device_mesh(..., mesh_dim_names=(..., 'ep'))",
        )
    return mesh[EP_DIM] if len(names) > 1 else mesh


def _parallelize_layer(layer: MoELayer, ep_mesh: DeviceMesh) -> None:
    ir = layer.ir
    want, have = ir.placement.expert_parallel, ep_mesh.size()
    if hasattr(layer, "_ep"):
        raise TargetError("placement.expert_parallel", f"layer {ir.name!r} is already expert-parallel")
    if want != have:
        raise TargetError(
            "placement.expert_parallel",
            f"{want}, but the mesh's {EP_DIM!r} dimension has {have} ranks (layer {ir.name!r})",
        )
    plan = EPPlan.make(ir, ep_mesh.get_group())
    for gi, grp in enumerate(ir.experts.groups):
        rows = plan.local_rows[gi]
        per_rank = grp.count // plan.world
        chunk = torch.arange(plan.rank * per_rank, (plan.rank + 1) * per_rank)
        shardable = grp.count % plan.world == 0 and torch.equal(rows, chunk)
        mod = layer.experts.get_submodule(str(gi))
        for name in WEIGHT_NAMES:
            full = getattr(mod, name, None)
            if full is None:
                continue
            local = full.detach()[rows.to(full.device)].clone()
            value = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False) if shardable else local
            setattr(mod, name, nn.Parameter(value, requires_grad=full.requires_grad))
    install_hooks(layer, plan)
    object.__setattr__(layer, "_ep", plan)
    setattr(layer, EP_RANKS_ATTR, plan.world)
    layer._lower()
