"""X-MoE cosine routing (`kind: cosine`): cosine scores on a low-dimensional projection."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.base import DType
from moespec.spec.routers.base import ROUTERS, Path, Problem, RouterParam, RouterSpec, at_most_routed

if TYPE_CHECKING:
    from torch import Tensor

    from moespec.spec.schema import LayerSpec

MIN_TEMPERATURE = 0.01
"""Floor of a learnable temperature (Tutel's cosine gate clamps its logit scale at 1/0.01)."""


def _log_temperature(tau: float) -> Tensor:
    import torch  # the spec package itself does not need torch

    return torch.full((1,), math.log(tau))


@ROUTERS.register
class CosineRouter(RouterSpec):
    """X-MoE cosine routing (Chi, Dong, Huang, Dai, Ma, Patra, Singhal, Bajaj, Song, Mao,
    Huang and Wei 2022, "On the Representation Collapse of Sparse Mixture of Experts",
    arXiv:2204.09179; microsoft/torchscale ``xmoe/routing.py``).

    h = W_proj x in R^{proj_dim}; s_e = cos(h, e_e) / tau with expert embeddings e [E, proj_dim]
    (orthogonal init, gain 0.32, as torchscale); p = softmax(s); each token takes its k
    best experts, weighted by their p (renormalised over the k if asked). Scoring on a
    low-dimensional hypersphere keeps the router from pulling token representations toward
    the expert centroids (the paper's representation collapse).

    Paper vs code: torchscale normalises only the expert embeddings (the token normalisation
    is commented out) and applies no temperature (its TEMPERATURE_FOR_L_UAX = 0.07 is unused);
    set `normalize_tokens: false` and `temperature: 1` for that. It also rescales e to norm 1.5
    in place before each forward, which changes nothing in the scores (e is normalised) and
    is not done here. `learnable_temperature` learns log tau (``router.log_temperature``,
    clamped at tau >= 0.01 as in Tutel's cosine gate).
    """

    kind: Literal["cosine"] = Field(description="X-MoE cosine routing on a low-dimensional projection.")
    k: int = Field(gt=0, description="Experts per token.")
    proj_dim: int = Field(16, gt=0, description="Dimension d_e of the routing projection (X-MoE: 16).")
    temperature: float = Field(
        0.07, gt=0, description="tau: cosine scores are divided by it (the start value when learnable)."
    )
    learnable_temperature: bool = Field(
        False, description="Learn log tau (router.log_temperature, tau clamped at >= 0.01)."
    )
    normalize_tokens: bool = Field(
        True,
        description="L2-normalise the projected token (the paper's cosine); torchscale does not "
        "(it normalises the expert embeddings only).",
    )
    renormalize: bool = Field(False, description="Divide the k selected weights by their sum.")
    dtype: DType | None = Field(None, description="Router compute dtype; defaults to target.router_dtype.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        return self.k

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        return d_model * self.proj_dim + self.proj_dim * layer.experts.n_routed

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        n = layer.experts.n_routed
        out = {
            "router.proj": RouterParam((self.proj_dim, d_model)),
            "router.expert_emb": RouterParam((n, self.proj_dim), "orthogonal", gain=0.32),
        }
        if self.learnable_temperature:
            out["router.log_temperature"] = RouterParam(
                (1,), value=partial(_log_temperature, self.temperature)
            )
        return out

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from at_most_routed(layer, at, "k", self.k)
        if self.learnable_temperature and self.temperature < MIN_TEMPERATURE:
            yield (
                (*at, "temperature"),
                f"a learnable temperature must start at or above its floor {MIN_TEMPERATURE} "
                f"(got {self.temperature})",
            )
        lb = layer.losses.load_balance
        if lb is not None and lb.kind == "importance_load_cv2":
            yield (
                (*at[:-1], "losses", "load_balance", "kind"),
                "importance_load_cv2 needs noisy logits; cosine routing has none (use switch or gshard)",
            )
