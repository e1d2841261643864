"""The small fx.Graph-building helper every lowering shares, and random graph inputs."""

from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx

from moespec.ir.nodes import MoELayerNode


@dataclass(frozen=True)
class RandomInput:
    """A random tensor the layer draws outside the graph: ``dist`` is uniform, normal or
    gumbel; ``shape`` names its dims (T tokens, D d_model, E experts, K rows per token)."""

    name: str
    dist: str
    shape: str
    train_only: bool


class Builder:
    """Appends call_function nodes to ``g``, each tagged with the spec path it lowers."""

    def __init__(self, layer: MoELayerNode) -> None:
        self.g, self.layer = fx.Graph(), layer

    def fn(self, target, *args, origin: str, **kwargs) -> fx.Node:
        node = self.g.call_function(target, args, kwargs)
        node.meta["moespec_origin"] = origin
        return node

    def method(self, obj: fx.Node, name: str, *args, origin: str) -> fx.Node:
        """``obj.name(*args)``: a call on a graph value (the expert-parallel plan's steps)."""
        node = self.g.call_method(name, (obj, *args))
        node.meta["moespec_origin"] = origin
        return node

    def get(self, name: str) -> fx.Node:
        return self.g.get_attr(name)

    def item(self, node: fx.Node, i: int, origin: str, name: str | None = None) -> fx.Node:
        out = self.fn(operator.getitem, node, i, origin=origin)
        if name is not None:
            out._rename(name)  # readable gm.code: `weight_tk = topk_route[0]`
        return out

    def to(self, node: fx.Node, dtype) -> fx.Node:
        return self.g.call_method("to", (node, dtype))

    def empty_like(self, node: fx.Node) -> fx.Node:
        """A 0-element tensor like ``node`` (custom ops take these for absent tensors)."""
        return self.g.call_method("new_empty", (node, (0,)))
