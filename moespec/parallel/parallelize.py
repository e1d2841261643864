"""``moespec.parallelize(module, mesh)``: expert parallelism for every moespec layer in a module.

Each rank builds the same layer (same seed), then keeps only its experts: the routed experts'
weights of expert group g become this rank's rows of the group, in ascending expert index.
Where those rows are the rank's ``Shard(0)`` chunk of the group (the default ``contiguous``
mapping whenever the group splits evenly), the parameter is a ``DTensor`` sharded on the
expert dimension over the mesh's ``ep`` dimension; under other mappings it is a plain local
tensor of this rank's experts. Router, shared and zero-compute experts stay replicated.

A layer whose losses have ``scope: global`` computes them, and its routing statistics, over
the tokens of every rank of the mesh (all its dimensions, ``dp`` included; in global rank
order): when the mesh is wider than ``ep`` the layer holds that group as ``_stats``
(:class:`~moespec.parallel.tokens.TokenGroup`). A mesh without ``ep`` serves such layers alone.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from moespec.errors import TargetError
from moespec.ir.nodes import MoELayerNode
from moespec.parallel.checkpoint import install_hooks
from moespec.parallel.plan import EPPlan
from moespec.parallel.tokens import TokenGroup
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
    process running the concatenation of every rank's tokens (in rank order). Layers with
    ``scope: global`` losses take their losses and statistics over every rank of ``mesh``;
    a mesh without an ``ep`` dimension (data parallelism alone) is for those layers only.
    """
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise TypeError(f"moespec.parallelize: {type(module).__name__} holds no moespec layer")
    for layer in layers:
        if hasattr(layer, "_ep") or hasattr(layer, "_stats"):
            raise TargetError("placement.expert_parallel", f"layer {layer.ir.name!r} is already parallelized")
    glob = [m for m in layers if is_global(m.ir)]
    ep_mesh = _ep_mesh(mesh, bool(glob))
    for layer in layers:  # every check before anything changes
        _check_degree(layer, ep_mesh)
    if glob and (ep_mesh is None or ep_mesh.size() < mesh.size()):
        every = TokenGroup.of(_flat_group(mesh))
        for layer in glob:
            object.__setattr__(layer, "_stats", every)
    for layer in layers:
        if ep_mesh is not None:
            _parallelize_layer(layer, ep_mesh)  # lowers the layer again
        elif hasattr(layer, "_stats"):
            layer._lower()
    return module


def is_global(ir: MoELayerNode) -> bool:
    """Whether the layer's losses run over every rank's tokens (``scope: global``)."""
    lb, z = ir.losses.load_balance, ir.losses.z_loss
    return any(getattr(loss, "scope", None) == "global" for loss in (lb, z))


def _ep_mesh(mesh: DeviceMesh, any_global: bool) -> DeviceMesh | None:
    """The mesh's ``ep`` dimension; None for a mesh without one when a layer has ``global``
    losses (data parallelism alone)."""
    names = mesh.mesh_dim_names or ()
    if EP_DIM not in names:
        if any_global:
            return None
        raise TargetError(
            "placement.expert_parallel",
            f"the mesh has no {EP_DIM!r} dimension (its dimensions: {list(names) or 'unnamed'}) and "
            "no layer has `scope: global` losses; make one with "
            "init_device_mesh(..., mesh_dim_names=(..., 'ep'))",
        )
    return mesh[EP_DIM] if len(names) > 1 else mesh


def _flat_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """One process group over every rank of ``mesh`` (the mesh itself when 1-D). Every rank
    of the default group runs this (``new_group`` is collective)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    return dist.new_group(ranks=sorted(mesh.mesh.flatten().tolist()))


def _check_degree(layer: MoELayer, ep_mesh: DeviceMesh | None) -> None:
    """``placement.expert_parallel`` equals the ``ep`` size (1 without an ``ep`` dimension)."""
    want, have = layer.ir.placement.expert_parallel, 1 if ep_mesh is None else ep_mesh.size()
    if want != have:
        where = f"the mesh's {EP_DIM!r} dimension has {have} ranks"
        if ep_mesh is None:
            where = f"the mesh has no {EP_DIM!r} dimension"
        raise TargetError("placement.expert_parallel", f"{want}, but {where} (layer {layer.ir.name!r})")


def _parallelize_layer(layer: MoELayer, ep_mesh: DeviceMesh) -> None:
    ir = layer.ir
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
