"""The layer's parameter table: every state_dict tensor's name, shape and initialisation.

Names are the checkpoint contract (clean, no shape suffix; ``docs/checkpoint.md`` lists them
all), with g the routed-group index, z the zero-compute list index, E_g the group's experts,
F_g its width:

  router.*                         what the router kind declares (``RouterSpec.params``)
  experts.{g}.w_up [E_g, F_g, D]   experts.{g}.w_gate [E_g, F_g, D] (glu)   experts.{g}.w_down [E_g, D, F_g]
  experts.{g}.b_up [E_g, F_g]      experts.{g}.b_gate [E_g, F_g] (glu)      experts.{g}.b_down [E_g, D]
  shared.w_up / w_gate / w_down / b_* as above with S = shared.count and F = shared.d_ff
  shared.gate [D] (shared.gate)
  zero_compute.{z}.w_c [n_z, 2, D]   zero_compute.{z}.v [n_z, D]   (constant experts only)
  multi_head.w_in / w_out [D, D], multi_head.b_in / b_out [D] (multi-head MoE)

The table is torch-free; ``moespec.common.params.init_params`` turns it into tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moespec.spec.experts import FFNSpec, InitSpec
from moespec.spec.routers.base import RouterParam
from moespec.spec.schema import LayerSpec, inner_d_model

FFN_LEAVES = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")


@dataclass(frozen=True)
class ParamNode:
    """One tensor of the layer's state.

    ``init`` is a :class:`~moespec.spec.routers.base.RouterParam` kind (``normal`` N(0, 0.02²),
    ``zeros``, ``ones``, ``constant`` (= ``gain``), ``uniform`` U(±gain), ``xavier``,
    ``orthogonal``) or ``ffn``: an expert FFN tensor initialised by ``ffn_init`` with
    ``fan_in`` (D for up/gate, F for down) and the output scale when ``down``. ``value``
    computes a fixed start instead (a hash table, a constant). ``buffer``: state, not trained
    by gradient (still in ``state_dict``); ``controller``: a running controller's state,
    kept in fp32 whatever the layer's dtype."""

    name: str
    shape: tuple[int, ...]
    init: str = "normal"
    buffer: bool = False
    gain: float = 1.0
    value: Callable[[], Any] | None = field(default=None, compare=False)
    controller: bool = False
    ffn_init: InitSpec | None = None
    fan_in: int = 0
    down: bool = False


def _declared(name: str, p: RouterParam) -> ParamNode:
    return ParamNode(name, p.shape, p.init, p.buffer, p.gain, p.value, p.controller)


def _ffn(prefix: str, ffn: FFNSpec, n: int, width: int, d: int) -> list[ParamNode]:
    glu = ffn.kind == "glu"
    shapes = {"w_up": (n, width, d), "w_gate": (n, width, d), "w_down": (n, d, width)}
    shapes |= {"b_up": (n, width), "b_gate": (n, width), "b_down": (n, d)}
    out = []
    for leaf in FFN_LEAVES:
        if (leaf.endswith("gate") and not glu) or (leaf.startswith("b_") and not ffn.bias):
            continue
        down = leaf.endswith("down")
        out.append(
            ParamNode(f"{prefix}.{leaf}", shapes[leaf], "ffn", ffn_init=ffn.init, fan_in=width if down else d,
                      down=down)
        )  # fmt: skip
    return out


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


def layer_params(layer: LayerSpec, d_model: int) -> tuple[ParamNode, ...]:
    """Every parameter and buffer of the layer, in registration order (see the module
    docstring); ``d_model`` is the model width (the router and experts work at
    ``inner_d_model``)."""
    ex, d = layer.experts, inner_d_model(layer, d_model)
    out = [_declared(name, p) for name, p in layer.router.params(layer, d).items()]
    for g, grp in enumerate(ex.routed):
        out += _ffn(f"experts.{g}", grp, grp.n_experts, grp.width, d)
    if ex.shared is not None:
        out += _ffn("shared", ex.shared, ex.shared.count, ex.shared.d_ff, d)
        if ex.shared.gate:
            out.append(ParamNode("shared.gate", (d,)))
    for z, zc in enumerate(ex.zero_compute):
        if zc.kind == "constant":
            out.append(ParamNode(f"zero_compute.{z}.w_c", (zc.count, 2, d)))
            out.append(ParamNode(f"zero_compute.{z}.v", (zc.count, d)))
    out += [_declared(name, p) for name, p in multi_head_params(layer, d_model).items()]
    return tuple(out)
