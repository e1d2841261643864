"""State dicts of expert-parallel layers: the same keys and global shapes as one process.

Legend: E_g experts of group g, L_g of them on this rank.

- A routed weight held as a ``DTensor`` (``Shard(0)`` over ``ep``) appears as that DTensor:
  ``torch.distributed.checkpoint`` saves each rank's shard and loads into any other sharding.
- A routed weight held as this rank's rows only (mappings whose experts are not the rank's
  ``Shard(0)`` chunk: ``round_robin``, explicit lists, groups that do not split evenly)
  appears as the full [E_g, ...] tensor in expert order, all-gathered over ``ep`` (the same on
  every rank, so a distributed checkpoint stores it once). That gather costs one group's full
  weights per rank while the state dict is alive; ``contiguous`` mappings avoid it.
- Loading accepts, for either form, the full tensor (a single-process checkpoint, an
  artifact's weights) or a DTensor of it, and keeps this rank's experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from moespec.parallel.comm import gather_tokens
from moespec.parallel.plan import EPPlan


def routed_weights(layer: nn.Module, plan: EPPlan) -> dict[str, tuple[int, nn.Parameter]]:
    """``experts.{g}.{name}`` -> (g, parameter) for every routed expert weight of ``layer``."""
    out = {}
    for gi in range(len(plan.local_rows)):
        for name, p in layer.experts.get_submodule(str(gi)).named_parameters(recurse=False):
            out[f"experts.{gi}.{name}"] = (gi, p)
    return out


def _full(local: Tensor, gi: int, plan: EPPlan) -> Tensor:
    """The group's full [E_g, ...] tensor in expert order from every rank's rows."""
    owners = plan.owner_E[plan.group_first[gi] : plan.group_first[gi] + plan.group_count[gi]]
    sizes = [int((owners == r).sum()) for r in range(plan.world)]
    rows_by_rank = torch.cat([torch.nonzero(owners == r).flatten() for r in range(plan.world)])
    gathered = gather_tokens(local.detach(), sizes, plan.rank, plan.group)
    full = gathered.new_empty(gathered.shape)
    full[rows_by_rank.to(full.device)] = gathered
    return full


def install_hooks(layer: nn.Module, plan: EPPlan) -> None:
    """Register the state-dict hooks of the module docstring on ``layer``."""
    weights = routed_weights(layer, plan)

    def save(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key, (gi, p) in weights.items():
            if not isinstance(p, DTensor) and prefix + key in state:
                state[prefix + key] = _full(state[prefix + key], gi, plan)

    def load(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for key, (gi, p) in weights.items():
            value = state.get(prefix + key)
            if value is None:
                continue  # load_state_dict reports the missing key
            if isinstance(value, DTensor):
                if (
                    isinstance(p, DTensor)
                    and value.placements == p.placements
                    and value.device_mesh == p.device_mesh
                ):
                    continue
                value = value.full_tensor()
            rows = plan.local_rows[gi].to(value.device)
            if tuple(value.shape) != (plan.group_count[gi], *p.shape[1:]):
                continue  # a wrong shape: load_state_dict reports it with the key's name
            local = value[rows]
            state[prefix + key] = (
                DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False)
                if isinstance(p, DTensor)
                else local
            )

    layer.register_state_dict_post_hook(save)
    layer.register_load_state_dict_pre_hook(load)
