"""Fresh tensors for a layer's parameter table (``moespec.ir.params``), the one init both the
module and the reference use.

Expert FFN tensors follow their spec's ``init``; every other tensor its declared kind (router,
noise, shared gate and zero-compute weights N(0, 0.02²) unless declared otherwise). Tensors are
initialised in fp32 in table order, FFN tensors first (so the random stream, and the weights
for a seed, do not depend on the dtype), then cast to the layer's dtype; integer tables keep
their dtype and running controllers' state stays fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from moespec.ir.params import ParamNode, layer_params
from moespec.spec.schema import LayerSpec

# Parameters the spec gives no init for: router, noise and zero-compute weights.
DEFAULT_STD = 0.02


def _init_ffn(t: Tensor, p: ParamNode, gen: torch.Generator) -> None:
    init = p.ffn_init
    assert init is not None
    scale = init.output_scale if p.down else 1.0
    if init.kind == "uniform_fan_in":
        # nn.Linear: weight and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = scale / math.sqrt(p.fan_in)
        t.uniform_(-bound, bound, generator=gen)
    elif p.name.rsplit(".", 1)[1].startswith("b_"):
        t.zero_()  # normal kinds: zero biases (the spec's std is about weights)
    elif init.kind == "normal":
        t.normal_(0.0, init.std * scale, generator=gen)
    else:
        std = init.std * scale
        torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=gen)


def _init_declared(t: Tensor, p: ParamNode, gen: torch.Generator) -> None:
    if p.init == "zeros":
        t.zero_()
    elif p.init == "ones":
        t.fill_(1.0)
    elif p.init == "constant":
        t.fill_(p.gain)
    elif p.init == "uniform":
        t.uniform_(-p.gain, p.gain, generator=gen)
    elif p.init == "xavier":
        torch.nn.init.xavier_uniform_(t, gain=p.gain, generator=gen)
    elif p.init == "orthogonal":
        torch.nn.init.orthogonal_(t, gain=p.gain, generator=gen)
    else:
        t.normal_(0.0, DEFAULT_STD, generator=gen)


def draw_params(
    table: tuple[ParamNode, ...],
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    cast: bool = True,
) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every entry of ``table`` in draw order: FFN tensors first, then
    the others, each in table order. Each tensor is drawn in fp32 and cast to ``dtype`` at
    once (integer tables keep their dtype, running controllers stay fp32), so a caller that
    consumes them one by one (:func:`moespec.export.weights.write_streaming`) holds one fp32
    tensor at a time. ``cast=False`` yields the fp32 draws uncast (the caller casts, e.g.
    slice by slice while writing)."""
    keep = {p.name for p in table if p.controller}

    def final(p: ParamNode, t: Tensor) -> Tensor:
        return t.to(dtype) if cast and t.is_floating_point() and p.name not in keep else t

    for p in table:
        if p.init == "ffn":
            t = torch.empty(
                p.shape, dtype=torch.float32, device="cpu"
            )  # drawn on the CPU whatever the default device
            _init_ffn(t, p, generator)
            yield p.name, final(p, t)
            del t  # before the next allocation: one fp32 draw alive at a time
    for p in table:
        if p.init == "ffn":
            continue
        if p.value is not None:
            # Computed from the spec (a hash table, a constant start): no draw; an integer
            # table keeps its dtype.
            fixed = p.value()
            assert tuple(fixed.shape) == tuple(p.shape), f"{p.name}: value shape {tuple(fixed.shape)}"
            yield p.name, final(p, fixed if not fixed.is_floating_point() else fixed.to(torch.float32))
            continue
        t = torch.empty(
            p.shape, dtype=torch.float32, device="cpu"
        )  # drawn on the CPU whatever the default device
        _init_declared(t, p, generator)
        yield p.name, final(p, t)
        del t


def init_params(
    table: tuple[ParamNode, ...], *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """``{name: tensor}`` for every entry of ``table``, in table order (:func:`draw_params`:
    the peak memory is the layer in ``dtype`` plus one fp32 tensor, not the whole layer in
    fp32; the weights for a seed are the same as drawing everything in fp32 first)."""
    out = dict(draw_params(table, generator=generator, dtype=dtype))
    return {p.name: out[p.name] for p in table}


def meta_params(table: tuple[ParamNode, ...], *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The tensors :func:`init_params` would make, on the ``meta`` device (shapes and dtypes,
    no storage): a layer whose weights are written without being held (``moespec build
    --meta``)."""
    out = {}
    for p in table:
        dt = torch.float32 if p.controller else dtype
        if p.value is not None and p.init != "ffn":
            fixed = p.value()  # small (a table, a constant): its dtype decides
            dt = fixed.dtype if not fixed.is_floating_point() else dt
        out[p.name] = torch.empty(p.shape, dtype=dt, device="meta")
    return out


def init_layer_params(
    layer: LayerSpec, d_model: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Fresh parameters for one layer spec (its table from :func:`moespec.ir.params.layer_params`)."""
    return init_params(layer_params(layer, d_model), generator=generator, dtype=dtype)


def param_shapes(layer: LayerSpec, d_model: int) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the layer with its shape."""
    return {p.name: p.shape for p in layer_params(layer, d_model)}


def buffer_names(layer: LayerSpec, d_model: int) -> set[str]:
    """Entries of the layer's parameter dict that are state (buffers), not trained."""
    return {p.name for p in layer_params(layer, d_model) if p.buffer}
