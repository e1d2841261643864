"""The top-level spec model (``moespec: 1``): a layer design, layer groups, placement, target."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from moespec.spec.base import DType, Strict
from moespec.spec.experts import ExpertsSpec
from moespec.spec.model import Model
from moespec.spec.routers import Router
from moespec.spec.schedules import Schedule
from moespec.spec.sparsity import Capacity, Dropless, LossesSpec


class MultiHeadSpec(Strict):
    """Multi-head MoE (Wu et al. 2024, MH-MoE, arXiv:2404.15045): x' = x W_in^T + b_in splits
    each token into `heads` sub-tokens of width d_model/heads that are routed and computed
    independently (router and experts work at width d_model/heads); the sub-token outputs are
    merged back and projected, y = y' W_out^T + b_out."""

    heads: int = Field(gt=1, description="Sub-tokens per token (must divide d_model).")
    bias: bool = Field(True, description="Whether the input and output projections have biases.")


class LayerSpec(Strict):
    """One MoE layer design: experts, router, capacity and losses."""

    experts: ExpertsSpec = Field(description="Routed, shared and zero-compute experts.")
    router: Router = Field(description="How tokens are assigned to experts; `kind` picks the method.")
    capacity: Capacity = Field(
        default_factory=lambda: Dropless(kind="dropless"),
        description="Token capacity per expert: `dropless` or a `factor`.",
    )
    losses: LossesSpec = Field(default_factory=LossesSpec, description="Auxiliary losses.")
    multi_head: MultiHeadSpec | None = Field(
        None, description="Multi-head MoE: split tokens into sub-tokens around the layer, if any."
    )
    schedules: list[Schedule] = Field(
        default_factory=list,
        description="Step schedules of router fields (`router.k`, `router.temperature`), evaluated "
        "each forward from the module's step (`set_step`); no recompilation.",
    )


def _layer_patch_optional(schema: dict) -> None:
    # Composition fills a missing `layer` with the base layer, so editors must not require it.
    schema["required"] = [r for r in schema.get("required", []) if r != "layer"]


def inner_d_model(layer: LayerSpec, d_model: int) -> int:
    """The width the router and experts work at: d_model, or d_model/heads for multi-head MoE."""
    return d_model // layer.multi_head.heads if layer.multi_head is not None else d_model


class GroupSpec(Strict):
    """A group of `count` identical MoE layers whose design differs from the base `layer`."""

    model_config = ConfigDict(json_schema_extra=_layer_patch_optional)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Group name (an identifier).")
    count: int = Field(1, gt=0, description="Number of MoE layers in this group.")
    # After composition `layer` is the base layer with this patch merged in (maps merge,
    # lists replace); editors see it as a free-form patch, since any subset may be given.
    layer: Annotated[
        LayerSpec,
        WithJsonSchema(
            {
                "type": "object",
                "description": "Patch merged over the top-level `layer` (maps merge, lists replace).",
            }
        ),
    ] = Field(description="Patch merged over the top-level `layer` (maps merge, lists replace).")


class PlacementSpec(Strict):
    """Expert parallelism: how routed FFN experts are spread over ranks."""

    expert_parallel: int = Field(
        1,
        gt=0,
        description="Expert-parallel degree (ranks sharing a layer's experts). Above 1 the layer "
        "runs only with expert parallelism over a mesh of that many ranks; forward refuses otherwise.",
    )
    mapping: Literal["contiguous", "round_robin"] | list[int] = Field(
        "contiguous",
        description="Expert-to-rank mapping: `contiguous` blocks, `round_robin`, or an explicit "
        "list giving the rank of each routed FFN expert. Zero-compute experts are replicated.",
    )


class TargetSpec(Strict):
    """What the compiler emits code for."""

    backend: Literal["torch", "triton"] = Field(
        "torch",
        description="`torch`: FX graph of custom ops run by torch kernels; `triton`: the same graph "
        "with the experts run by Triton kernels generated for the spec (CUDA, or the CPU under "
        "TRITON_INTERPRET=1; elsewhere building a live module is an error, artifacts are written anywhere).",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Device the built module is placed on (`moespec.build`, `moespec.load`); an "
        "error where it is absent, unless `device=` is passed. Artifacts are written on any machine.",
    )
    arch: Literal["auto", "sm80", "sm86", "sm89", "sm90", "sm100"] = Field(
        "auto",
        description="GPU architecture for kernel tuning; `auto` detects it (CUDA only). Another value "
        "must match the GPU's compute capability when the module is built on it.",
    )
    dtype: DType = Field("fp32", description="Parameter and activation dtype.")
    router_dtype: DType = Field("fp32", description="Router compute dtype (selective precision).")


class Spec(Strict):
    """A moespec v1 spec: one MoE layer design, optionally in several differing groups, and
    optionally the network (`model:`) they sit in."""

    moespec: Literal[1] = Field(description="Spec language version; must be 1.")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of the design (file-name safe)."
    )
    description: str = Field("", description="Free text shown by `moespec explain`.")
    extends: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                "description": "Spec file(s) this one extends, relative to this file.",
            }
        ),
    ] = Field(None, description="Spec file path(s) this one extends, relative to it; merged first.")
    d_model: int = Field(gt=0, description="Model (token) width.")
    layer: LayerSpec = Field(description="The MoE layer design (the base of every group).")
    groups: list[GroupSpec] = Field(
        default_factory=list,
        description="Layer groups that differ from `layer`; if empty, the spec is one layer.",
    )
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Expert parallelism.")
    target: TargetSpec = Field(default_factory=TargetSpec, description="Code generation target.")
    model: Model | None = Field(
        None,
        description="The whole network around the MoE layers (`decoder_lm` or `encoder`); without "
        "it the spec describes one MoE layer (or its groups).",
    )

    def layer_groups(self) -> list[tuple[str, int, LayerSpec]]:
        """``(name, count, layer)`` for each group; the base layer alone if there are none."""
        if not self.groups:
            return [("layer", 1, self.layer)]
        return [(g.name, g.count, g.layer) for g in self.groups]

    def layer_named(self, name: str | None = None) -> LayerSpec:
        """The layer of group ``name`` (the base ``layer`` when None or ``"layer"`` and there
        are no groups); KeyError naming the groups otherwise."""
        groups = {n: lay for n, _, lay in self.layer_groups()}
        key = name or "layer"
        if key not in groups:
            raise KeyError(f"no layer group {key!r}; the spec has {sorted(groups)}")
        return groups[key]
