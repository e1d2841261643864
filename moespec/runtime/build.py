"""A live layer from a validated spec: resolve the IR, check the machine can run the target,
draw the weights. ``moespec.build`` (the API), ``moespec.load`` and the artifact writer all
build layers here, so none of them imports the API."""

from __future__ import annotations

import torch

from moespec.errors import BuildError
from moespec.ir.build import build_program
from moespec.runtime.layer import MoELayer
from moespec.runtime.memory import check_layer_fits
from moespec.runtime.target import check_runnable
from moespec.spec.schema import Spec


def build_layer(
    spec: Spec,
    *,
    layer: str | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    allow_large: bool = False,
    meta: bool = False,
    artifact: bool = False,
) -> MoELayer:
    """The layer group ``layer`` of ``spec`` (the only one when None) with weights drawn from
    ``seed``, on ``device`` (``target.device`` when None; :class:`TargetError` if this machine
    cannot run the target; :class:`BuildError` for an unknown or missing group name, or when
    the weights would not fit in this machine's memory, unless ``allow_large``). ``meta``:
    weights on the meta device, for :func:`moespec.export.artifact.build_artifact`'s
    streamed write. ``artifact``: the layer is only written out (no kernel runs: a triton
    target's kernels need not run on this machine)."""
    program = build_program(spec)
    # An artifact's layer (meta, or drawn on the CPU to be written) runs no kernel.
    dev = check_runnable(program, device, kernels=not (meta or artifact))
    names = [lay.name for lay in program.layers]
    if layer is None and len(names) > 1:
        raise BuildError(
            f"the spec has layer groups {names}; pick one with layer=<name> (`--layer NAME` on the "
            "command line)"
        )
    name = layer or names[0]
    if name not in names:
        raise BuildError(f"no layer group {name!r}; the spec has {names}")
    ir = program.layers[names.index(name)]
    check_layer_fits(ir, allow_large=allow_large, meta=meta)
    if meta:  # shapes only: the artifact writer draws and writes the weights one at a time
        return MoELayer(ir, seed=seed, generator=generator, meta=True)
    # Weights are drawn on the CPU whatever the device, so every device gets the same ones.
    return MoELayer(ir, seed=seed, generator=generator).to(dev)
