"""Routing state carried across the MoE blocks of a network.

A router declares the per-token inputs it reads besides x (``RouterSpec.extra_inputs``). In a
layer built alone the user passes them (``layer(x, prev_router_logits=...)``); in a network
the model supplies them from a state dict that flows block to block:

- ``input_ids``: the network's input, set once before the first block (hash routing);
- ``prev_router_logits``: the previous MoE block's router logits, [T, E] (MoE++'s gating
  residual); absent before the first MoE block, where the layer uses zeros.

A cross-layer router still to come (momentum over layers, pre-gating one block ahead) adds a
supplier here, and, if it carries something new, an entry to :data:`PUBLISHERS`: what each MoE
block writes into the state after it runs. Nothing else of the network changes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moespec.errors import BuildError
from moespec.lower.fx import extra_inputs
from moespec.runtime.layer import MoELayer

State = dict[str, Tensor]

# extra input name -> how the network reads it from the state (None: the layer's default).
SUPPLIERS: dict[str, Callable[[State], Tensor | None]] = {
    "input_ids": lambda state: state["input_ids"],
    "prev_router_logits": lambda state: state.get("router_logits"),
}

# state key -> what an MoE block leaves for the next ones after its forward.
PUBLISHERS: dict[str, Callable[[MoELayer], Tensor | None]] = {
    "router_logits": lambda layer: layer.router_logits,
}


def check_suppliable(layer: MoELayer, where: str) -> None:
    """BuildError when ``layer`` reads an input the network cannot supply."""
    for e in extra_inputs(layer.ir):
        if e.name not in SUPPLIERS:
            raise BuildError(
                f"{where}: the {layer.ir.router.kind} router reads `{e.name}`, which a network cannot supply"
            )


def layer_inputs(layer: MoELayer, state: State) -> dict[str, Tensor | None]:
    """The keyword inputs of ``layer``'s forward, read from ``state``."""
    return {e.name: SUPPLIERS[e.name](state) for e in extra_inputs(layer.ir)}


def publish(layer: MoELayer, state: State) -> None:
    """Record what ``layer`` leaves for the following MoE blocks."""
    for key, read in PUBLISHERS.items():
        value = read(layer)
        if value is not None:
            state[key] = value
