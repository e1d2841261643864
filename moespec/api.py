"""The Python API: ``moespec.build`` and ``moespec.aux_losses``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from moespec.errors import BuildError
from moespec.ir.build import build_program
from moespec.runtime.layer import MoELayer
from moespec.runtime.target import check_runnable
from moespec.spec.load import LoadedSpec, load_spec
from moespec.spec.schema import Spec


def build(
    spec: str | Path | dict | Spec | LoadedSpec,
    overrides: tuple[str, ...] | list[str] = (),
    *,
    layer: str | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
) -> MoELayer:
    """Build the MoE layer a spec describes (``layer`` picks a group when there are several).

    ``spec`` is a path, a dict or a validated spec; ``overrides`` use the CLI's ``a.b=v``
    syntax. ``seed`` seeds the weight init; ``generator`` drives jitter, noise and random
    policies (the global RNG when None). The layer goes on ``device``, or on ``target.device``
    when None; :class:`~moespec.errors.TargetError` if this machine cannot run the target.
    """
    loaded = load_spec(spec, overrides)
    program = build_program(loaded.spec)
    dev = check_runnable(program, device)
    names = [lay.name for lay in program.layers]
    if layer is None and len(names) > 1:
        raise BuildError(f"the spec has layer groups {names}; pass layer=<name>")
    name = layer or names[0]
    if name not in names:
        raise BuildError(f"no layer group {name!r}; the spec has {names}")
    ir = program.layers[names.index(name)]
    # Weights are drawn on the CPU whatever the device, so every device gets the same ones.
    return MoELayer(ir, seed=seed, generator=generator).to(dev)


def set_step(model: nn.Module, step: int) -> None:
    """Set the schedule step of every moespec layer with schedules inside ``model``."""
    for m in model.modules():
        if isinstance(m, MoELayer) and m.ir.schedules:
            m.set_step(step)


def aux_losses(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every moespec layer inside ``model`` (0 if none ran yet)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELayer) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
