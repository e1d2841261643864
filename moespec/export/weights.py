"""Writing ``model.safetensors`` without holding the layer: each tensor is drawn, written at
its place in the file and freed before the next (``moespec build --meta``).

The file is the safetensors format as :func:`safetensors.torch.save_file` writes it: an
8-byte little-endian header length, a JSON header (``__metadata__`` and, per tensor, its
dtype, shape and ``data_offsets``) padded with spaces to a multiple of 8, then the tensors'
bytes. The header is known before any weight exists (shapes and dtypes come from the layer's
meta tensors), so tensors can be written in draw order at precomputed offsets. Readers
(``safetensors``, ``moespec.load``) see the same tensors as with ``save_file``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from moespec.common.params import draw_params
from moespec.runtime.layer import MoELayer
from moespec.runtime.memory import WRITE_SLICE as _SLICE

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
}


def write_streaming(path: Path, module: MoELayer, seed: int, metadata: dict[str, str]) -> None:
    """Write the state of the meta-device ``module`` (built with ``meta=True``) as it would be
    with real weights drawn from ``seed``: the same values :func:`moespec.common.params.init_params`
    gives, holding one fp32 tensor and one slice at a time."""
    state = module.state_dict()  # meta tensors for the parameter table, real ones otherwise
    header: dict[str, object] = {"__metadata__": metadata}
    offsets, at = {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        offsets[name] = at
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)

    def put(f, name: str, t: torch.Tensor) -> None:
        # Cast to the file's dtype slice by slice (elementwise rounding: the same values as a
        # whole-tensor cast) so only the fp32 draw and one slice are in memory.
        want = state[name]
        assert tuple(t.shape) == tuple(want.shape), name
        flat = t.detach().contiguous().view(-1)
        f.seek(start + offsets[name])
        for lo in range(0, max(flat.numel(), 1), _SLICE):
            part = flat[lo : lo + _SLICE].to(want.dtype)
            f.write(memoryview(part.view(torch.uint8).numpy()))  # no extra copy

    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, t in draw_params(module.ir.params, generator=gen, dtype=module.dtype, cast=False):
            put(f, name, t)
            del t  # let it go before the next is drawn (the loop rebinds only after)
        for name, t in state.items():
            if t.device.type != "meta":  # state outside the parameter table (a schedule step)
                put(f, name, t)
        f.truncate(start + at)
