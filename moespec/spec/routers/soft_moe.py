"""The Soft MoE router (`kind: soft_moe`): slots are softmax-weighted mixes of all tokens."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterParam, RouterSpec, unusable

if TYPE_CHECKING:
    from moespec.spec.schema import LayerSpec


@ROUTERS.register
class SoftMoERouter(RouterSpec):
    """Soft MoE (Puigcerver, Riquelme, Mustafa, Houlsby 2023, "From Sparse to Soft Mixtures of
    Experts", ICLR 2024, arXiv:2308.00951; code: google-research/vmoe ``SoftRouter``).

    Every expert has p slots (``router.weight`` row s = e·p + j is slot j of expert e). In one
    routing group of T tokens X [T, D]: logits L = X̂ Φ̂ᵀ [T, E·p] with X̂ = l2norm(X) per
    token and Φ̂ = scale · l2norm(Φ) per slot (``normalize``, the paper's fix for large d;
    plain L = X Φᵀ otherwise); dispatch D = softmax of L over the **tokens** (each slot is a
    convex mix of tokens), combine C = softmax of L over **all slots** (each token a convex
    mix of slot outputs); slot inputs X̃ = Dᵀ X, slot s runs expert s // p, Y = C Ỹ.

    A 3-D input [B, S, D] is B groups of S tokens (the paper routes each image on its own,
    so an example's output never depends on the rest of the batch); any other input is one
    group. The layer is dropless and has no balance loss by construction, and not causal
    (a slot mixes every token of its group; ``autoregressive: true`` is an error).
    ``group_size`` is only for the derived numbers: per token, E·p/group_size expert FFNs
    run, and the router costs 3·D·E·p multiply-accumulates (logits, X̃ = DᵀX and Y = CỸ,
    each D·E·p per token); active parameters count that fraction of the experts.
    """

    kind: Literal["soft_moe"] = Field(description="Soft MoE (token mixing into expert slots).")
    slots_per_expert: int = Field(1, gt=0, description="Slots p per expert (the paper's models: 1).")
    normalize: bool = Field(
        True,
        description="l2-normalise the tokens and the slot parameters and multiply the logits by a "
        "learned scalar `router.scale` (init 1), as the paper (for large d) and vmoe's SoftRouter "
        "do; false: plain logits x·Φ.",
    )
    group_size: int = Field(
        gt=0,
        description="Tokens per routing group, for the derived numbers only (experts per token = "
        "E·p / group_size); the runtime group is the input's sequence. Soft MoE ViT-B/16 at 224²: 196.",
    )
    autoregressive: bool = Field(
        False,
        description="The layer is used in a causal (autoregressive) model. Soft MoE mixes every "
        "token of a group into every slot, so `true` is an error.",
    )
    dtype: DType | None = Field(
        None, description="Router compute dtype (logits, softmaxes); defaults to target.router_dtype."
    )

    def n_slots(self, layer: LayerSpec) -> int:
        """Slots per group, E·p."""
        return layer.experts.n_routed * self.slots_per_expert

    def experts_per_token(self, layer: LayerSpec) -> float:
        # E·p slots run an expert FFN per group of `group_size` tokens.
        return self.n_slots(layer) / self.group_size

    def rows_per_token(self, layer: LayerSpec) -> int:
        # No dispatch buffer: the slots are a static [E·p, D] block per group. Kept in 1..E.
        return min(layer.experts.n_routed, max(1, math.ceil(self.experts_per_token(layer))))

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        # Logits x·Φ, slot inputs X̃ = DᵀX and outputs Y = CỸ: each D·E·p MACs per token.
        return 3 * d_model * self.n_slots(layer)

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        # vmoe inits Φ lecun_normal; with `normalize` the forward only sees Φ's direction.
        out = {"router.weight": RouterParam((self.n_slots(layer), d_model))}
        if self.normalize:
            out["router.scale"] = RouterParam((), "ones")
        return out

    @property
    def causal(self) -> bool:
        # Every slot mixes every token of its group, later ones included.
        return False

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        if self.autoregressive:
            yield (
                (*at, "autoregressive"),
                "Soft MoE mixes every token of a group into every slot, so a token's output depends "
                "on later tokens; not usable in a causal decoder (the paper leaves it to future work)",
            )
        yield from unusable(
            layer,
            at,
            "capacity",
            "Soft MoE drops no tokens (each expert gets exactly p slots): use capacity: dropless",
        )
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "Soft MoE is balanced by construction (p slots per expert): remove load_balance",
        )
        yield from unusable(
            layer,
            at,
            "losses.z_loss",
            "the router z-loss is for token-choice logits; Soft MoE has none (remove z_loss)",
        )
        if layer.experts.zero_compute:
            yield (
                (*at[:-1], "experts", "zero_compute"),
                "zero-compute experts are not supported with Soft MoE (slots run routed FFN experts)",
            )
