"""Checks that a live module can honour the spec's target; nothing in ``target`` or
``placement`` is silently ignored.

``validate``, ``explain`` and writing an artifact (``moespec build -o``) describe a target and
never look at this machine: a laptop may write the artifact of a GPU-cluster layer. A live
module (``moespec.build``, ``moespec.load``) is where the machine is checked:

- ``target.backend: triton``: a live module needs its generated kernels to run on its device:
  CUDA with Triton installed, or the CPU only under Triton's interpreter (``TRITON_INTERPRET=1``
  set before triton is imported); elsewhere a TargetError, never the torch kernels instead.
  Artifacts (``moespec build -o``) are written on any machine, kernels rendered in;
- ``target.device: cuda``: the module is built on CUDA; without a CUDA device that fails
  unless the caller names another device explicitly (``device=`` of build/load);
- ``target.arch`` other than ``auto``: the CUDA device's compute capability must match it;
- ``placement.expert_parallel > 1``: the layer refuses to run (forward) until expert
  parallelism over a mesh of that size is applied to it (``moespec.parallelize``, which sets
  :data:`EP_RANKS_ATTR` on the layer).
"""

from __future__ import annotations

import torch

from moespec.codegen.load import require_triton
from moespec.errors import BuildError, TargetError
from moespec.ir.nodes import MoELayerNode, Program

# Compute capability (major, minor) of each `target.arch` value.
ARCH_CAPABILITY: dict[str, tuple[int, int]] = {
    "sm80": (8, 0),
    "sm86": (8, 6),
    "sm89": (8, 9),
    "sm90": (9, 0),
    "sm100": (10, 0),
}

# The layer attribute expert parallelism sets to the size of the mesh's "ep" dimension.
EP_RANKS_ATTR = "expert_parallel_ranks"


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise BuildError(f"unknown device {device!r} (expected e.g. cpu, cuda, cuda:1)") from None


def check_runnable(
    program: Program, device: str | torch.device | None = None, *, kernels: bool = True
) -> torch.device:
    """The device a live module of ``program`` goes on, after checking this machine provides it.

    ``device`` None means the spec's ``target.device``; an explicit device overrides it (the
    caller chose it, e.g. ``moespec.load(DIR, device="cpu")``). ``target.arch`` is checked
    whenever the module goes on a CUDA device. Raises :class:`~moespec.errors.TargetError`
    naming the spec field at fault, or ``BuildError`` for a bad explicit ``device``.
    ``kernels`` False skips the backend's check (an artifact is written, no kernel runs).
    """
    explicit = device is not None
    dev = _device(device if explicit else program.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        if explicit:
            raise BuildError(f"cannot use device {dev}: this machine has no CUDA device")
        raise TargetError(
            "target.device",
            "cuda, but this machine has no CUDA device (torch.cuda.is_available() is False); build "
            "the artifact with `moespec build SPEC -o DIR` and load it on a GPU machine, or pass "
            "device=... to moespec.load / moespec.build",
        )
    if dev.type == "cuda" and program.arch != "auto":
        have = torch.cuda.get_device_capability(dev)
        want = ARCH_CAPABILITY[program.arch]
        if tuple(have) != want:
            raise TargetError(
                "target.arch",
                f"{program.arch} (compute capability {want[0]}.{want[1]}), but {dev} is "
                f"sm{have[0]}{have[1]} (capability {have[0]}.{have[1]}); set target.arch to "
                f"sm{have[0]}{have[1]} or auto, or run on a matching GPU",
            )
    if kernels and program.backend == "triton":
        require_triton(dev.type)
    return dev


def check_expert_parallel(layer: torch.nn.Module) -> None:
    """Raise unless ``layer`` (a MoELayer) runs with the expert parallelism its spec asks for.

    A spec with ``placement.expert_parallel`` = n > 1 describes a layer whose experts are spread
    over n ranks; run on one process it would silently compute something else (all experts on
    every rank). Called at the top of ``forward``: a plain attribute read, no host sync.
    """
    ir: MoELayerNode = layer.ir
    want = ir.placement.expert_parallel
    have = getattr(layer, EP_RANKS_ATTR, 1)
    if have != want:
        raise TargetError(
            "placement.expert_parallel",
            f"{want}, but layer {ir.name!r} runs "
            + ("without expert parallelism" if have == 1 else f"over an expert-parallel mesh of {have}")
            + f"; apply expert parallelism over a mesh whose 'ep' dimension has {want} ranks "
            "(moespec.parallelize(layer, mesh)), or set placement.expert_parallel: 1",
        )
