"""Checkpoints of ``moespec train``: one safetensors file per saved step holding the model's
state, the AdamW state and the RNG state, so a run resumes bit for bit.

Keys: ``model.<name>`` (the state dict), ``optim.<i>.<field>`` (AdamW's per-parameter
``step``, ``exp_avg``, ``exp_avg_sq``, parameters in ``model.parameters()`` order) and
``rng.torch`` (the global CPU generator's state: jitter and noise draw from it; ``rng.cuda``
too where CUDA is present); the step
is in the file's metadata. Files are ``checkpoints/step-NNNNNNNN.safetensors``, written
atomically (a temporary sibling renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from moespec.outputs import make_parents, temp_sibling, writing

PATTERN = re.compile(r"^step-(\d{8})\.safetensors$")


def path_for(out: Path, step: int) -> Path:
    """The checkpoint file of ``step`` under the run directory ``out``."""
    return out / "checkpoints" / f"step-{step:08d}.safetensors"


def latest(out: Path) -> tuple[int, Path] | None:
    """(step, path) of the newest checkpoint under ``out``, or None."""
    folder = out / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("*.safetensors") if (m := PATTERN.match(p.name))]
    return max(found) if found else None


def save(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write the checkpoint of ``step``; returns its path."""
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    for p, state in optimizer.state.items():
        for field, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index[id(p)]}.{field}"] = t.detach().contiguous().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # noise drawn on the GPU uses its generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    target = path_for(out, step)
    make_parents(target)
    tmp = temp_sibling(target)
    try:
        with writing(target):
            save_file(tensors, str(tmp), metadata={"step": str(step)})
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return target


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG from ``path``; returns the checkpoint's step."""
    with safe_open(str(path), framework="pt") as f:
        step = int((f.metadata() or {})["step"])
    tensors = load_file(str(path))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    params = list(model.parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, field = key.split(".", 2)
            state.setdefault(int(i), {})[field] = value
    sd = optimizer.state_dict()
    sd["state"] = {i: s for i, s in state.items() if i < len(params)}
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step
