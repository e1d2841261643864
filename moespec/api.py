"""The Python API: ``moespec.build``, ``moespec.load``, ``moespec.aux_losses``, ``moespec.set_step``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moespec.errors import BuildError
from moespec.runtime.build import build_layer
from moespec.runtime.layer import MoELayer
from moespec.runtime.network import MoENetwork, build_network
from moespec.spec.load import LoadedSpec, load_spec
from moespec.spec.schema import Spec

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["BuildError", "aux_losses", "build", "load", "set_step"]


def build(
    spec: str | Path | dict | Spec | LoadedSpec,
    overrides: tuple[str, ...] | list[str] = (),
    *,
    layer: str | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    allow_large: bool = False,
) -> MoELayer | MoENetwork:
    """Build what a spec describes: with a `model:` section the network
    (:class:`~moespec.runtime.network.MoENetwork`), unless ``layer`` names one of its MoE
    layer designs (``"layer"`` for the base layer, or a group); without one the MoE layer
    (``layer`` picks a group when there are several).

    ``spec`` is a path, a dict or a validated spec; ``overrides`` use the CLI's ``a.b=v``
    syntax. ``seed`` seeds the weight init; ``generator`` drives jitter, noise and random
    policies (the global RNG when None). The layer goes on ``device``, or on ``target.device``
    when None; :class:`~moespec.errors.TargetError` if this machine cannot run the target.
    A layer whose weights would not fit in this machine's memory is refused before anything
    is allocated (:class:`~moespec.errors.BuildError` with the estimate), unless
    ``allow_large``.
    """
    loaded = load_spec(spec, overrides)
    if loaded.spec.model is not None and layer is None:
        return build_network(
            loaded.spec, seed=seed, generator=generator, device=device, allow_large=allow_large
        )
    return build_layer(
        loaded.spec, layer=layer, seed=seed, generator=generator, device=device, allow_large=allow_large
    )


def set_step(model: nn.Module, step: int) -> None:
    """Set the schedule step of every moespec layer with schedules inside ``model``."""
    for m in model.modules():
        if isinstance(m, MoELayer) and m.ir.schedules:
            m.set_step(step)


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    *,
    mesh: DeviceMesh | None = None,
    verify: bool = True,
    allow_large: bool = False,
) -> MoELayer | MoENetwork:
    """The layer (or network) of the artifact directory ``path`` (:func:`moespec.runtime.load.load`: every
    check, ``device``, ``verify`` and ``allow_large`` as there). With ``mesh`` the layer is
    then made expert-parallel over its ``ep`` dimension (:func:`moespec.parallel.parallelize`):
    each rank keeps its experts of the artifact's weights."""
    from moespec.runtime.load import load as load_artifact

    layer = load_artifact(path, device, verify=verify, allow_large=allow_large)
    if mesh is None:
        return layer
    if not isinstance(layer, MoELayer):
        raise BuildError(f"{path}: holds a network; expert parallelism over a mesh takes one MoE layer")
    from moespec.parallel import parallelize

    parallelize(layer, mesh)
    return layer


def aux_losses(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every moespec layer inside ``model`` (0 if none ran yet)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
