"""Parameter names, shapes and initialisation of one MoE layer (the reference's contract).

Names (clean, no shape suffix: they are the checkpoint contract), with g the routed-group
index, z the zero-compute list index, E_g the group's materialised experts, F_g its width:

  router.weight [E, D]          router.bias [E] (bias)      router.noise_weight [E, D] (learned noise)
  router.expert_bias [E]        buffer, not trained by gradient (expert_bias)
  experts.{g}.w_up [E_g, F_g, D]   experts.{g}.w_gate [E_g, F_g, D] (glu)   experts.{g}.w_down [E_g, D, F_g]
  experts.{g}.b_up [E_g, F_g]      experts.{g}.b_gate [E_g, F_g] (glu)      experts.{g}.b_down [E_g, D]
  shared.w_up / w_gate / w_down / b_* as above with S = shared.count and F = shared.d_ff
  shared.gate [D] (shared.gate)
  zero_compute.{z}.w_c [n_z, 2, D]   zero_compute.{z}.v [n_z, D]   (constant experts only)

Shape legend: D d_model, E experts, F ffn width, S shared experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moespec.spec.experts import FFNSpec
from moespec.spec.routers.base import RouterParam
from moespec.spec.schema import LayerSpec, inner_d_model

BUFFERS = ("router.expert_bias",)
"""Buffers of the top-k router; :func:`buffer_names` gives those of any layer."""


def buffer_names(layer: LayerSpec, d_model: int) -> set[str]:
    """Entries of the layer's parameter dict that are state (buffers), not trained."""
    return {name for name, p in layer.router.params(layer, inner_d_model(layer, d_model)).items() if p.buffer}


FFN_LEAVES = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")

# Parameters the spec gives no init for: router, noise and zero-compute weights.
DEFAULT_STD = 0.02


def _ffn_shapes(prefix: str, ffn: FFNSpec, n: int, width: int, d: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.w_up": (n, width, d)}
    if ffn.kind == "glu":
        shapes[f"{prefix}.w_gate"] = (n, width, d)
    shapes[f"{prefix}.w_down"] = (n, d, width)
    if ffn.bias:
        shapes[f"{prefix}.b_up"] = (n, width)
        if ffn.kind == "glu":
            shapes[f"{prefix}.b_gate"] = (n, width)
        shapes[f"{prefix}.b_down"] = (n, d)
    return shapes


def param_shapes(layer: LayerSpec, d_model: int) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer of the layer with its shape (see the module docstring)."""
    ex, d = layer.experts, inner_d_model(layer, d_model)
    shapes = {name: p.shape for name, p in layer.router.params(layer, d).items()}
    for g, grp in enumerate(ex.routed):
        shapes.update(_ffn_shapes(f"experts.{g}", grp, grp.n_experts, grp.width, d))
    if ex.shared is not None:
        shapes.update(_ffn_shapes("shared", ex.shared, ex.shared.count, ex.shared.d_ff, d))
        if ex.shared.gate:
            shapes["shared.gate"] = (d,)
    for z, zc in enumerate(ex.zero_compute):
        if zc.kind == "constant":
            shapes[f"zero_compute.{z}.w_c"] = (zc.count, 2, d)
            shapes[f"zero_compute.{z}.v"] = (zc.count, d)
    shapes.update({name: p.shape for name, p in multi_head_params(layer, d_model).items()})
    return shapes


def multi_head_params(layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
    """MH-MoE's projections around the layer: W_in xavier-uniform with gain 1/sqrt 2 and W_out
    xavier-uniform with gain 1 (the official torchscale MH-MoE layer), zero biases."""
    mh = layer.multi_head
    if mh is None:
        return {}
    d = d_model
    out = {"multi_head.w_in": RouterParam((d, d), "xavier", gain=2**-0.5)}
    if mh.bias:
        out["multi_head.b_in"] = RouterParam((d,), "zeros")
    out["multi_head.w_out"] = RouterParam((d, d), "xavier")
    if mh.bias:
        out["multi_head.b_out"] = RouterParam((d,), "zeros")
    return out


def _init_ffn(out: dict[str, Tensor], prefix: str, ffn: FFNSpec, gen: torch.Generator) -> None:
    """Fill the FFN entries of ``out`` (already allocated) following ``ffn.init``."""
    init = ffn.init
    for leaf in FFN_LEAVES:
        name = f"{prefix}.{leaf}"
        if name not in out:
            continue
        t = out[name]
        is_down = leaf.endswith("down")
        # fan_in: D for up/gate (last dim of [E, F, D]), F for down (last dim of [E, D, F]).
        fan_in = out[f"{prefix}.w_{'down' if is_down else 'up'}"].shape[-1]
        scale = init.output_scale if is_down else 1.0
        if init.kind == "uniform_fan_in":
            # nn.Linear: weight and bias both U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = scale / math.sqrt(fan_in)
            t.uniform_(-bound, bound, generator=gen)
        elif leaf.startswith("b_"):
            t.zero_()  # normal kinds: zero biases (the spec's std is about weights)
        elif init.kind == "normal":
            t.normal_(0.0, init.std * scale, generator=gen)
        else:
            std = init.std * scale
            torch.nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=gen)


def _init_other(t: Tensor, p: RouterParam | None, gen: torch.Generator) -> None:
    """Router tensors per their :class:`RouterParam`; anything else N(0, 0.02²)."""
    kind = p.init if p is not None else "normal"
    if kind == "zeros":
        t.zero_()
    elif kind == "ones":
        t.fill_(1.0)
    elif kind == "constant":
        t.fill_(p.gain)  # type: ignore[union-attr]
    elif kind == "uniform":
        t.uniform_(-p.gain, p.gain, generator=gen)  # type: ignore[union-attr]
    elif kind == "xavier":
        torch.nn.init.xavier_uniform_(t, gain=p.gain, generator=gen)  # type: ignore[union-attr]
    elif kind == "orthogonal":
        torch.nn.init.orthogonal_(t, gain=p.gain, generator=gen)  # type: ignore[union-attr]
    else:
        t.normal_(0.0, DEFAULT_STD, generator=gen)


def init_reference_params(
    layer: LayerSpec, d_model: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Fresh parameters for one layer: expert FFNs per their ``init`` spec; router, noise,
    shared gate and zero-compute weights N(0, 0.02²) (the spec has no init for them);
    router bias and expert bias zero. Initialised in fp32, then cast to ``dtype``."""
    shapes = param_shapes(layer, d_model)
    out = {name: torch.empty(shape, dtype=torch.float32) for name, shape in shapes.items()}
    for g, grp in enumerate(layer.experts.routed):
        _init_ffn(out, f"experts.{g}", grp, generator)
    if layer.experts.shared is not None:
        _init_ffn(out, "shared", layer.experts.shared, generator)
    router = layer.router.params(layer, inner_d_model(layer, d_model)) | multi_head_params(layer, d_model)
    for name, t in out.items():  # dict order, so the draw order is fixed
        if name.rsplit(".", 1)[1] in FFN_LEAVES:
            continue
        p = router.get(name)
        if p is not None and p.value is not None:
            # Computed from the spec (a hash table, a constant start): no draw; an integer
            # table keeps its dtype.
            fixed = p.value()
            assert tuple(fixed.shape) == tuple(t.shape), f"{name}: value shape {tuple(fixed.shape)}"
            out[name] = fixed if not fixed.is_floating_point() else fixed.to(torch.float32)
            continue
        _init_other(t, p, generator)
    return {name: out[name].to(dtype) if out[name].is_floating_point() else out[name] for name in shapes}
