"""Hash routing (`kind: hash`): a fixed token-id -> expert table, no router parameters."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from moespec.spec.routers.base import (
    ROUTERS,
    ExtraInput,
    Path,
    Problem,
    RouterParam,
    RouterSpec,
    at_most_routed,
    unusable,
)

if TYPE_CHECKING:
    from torch import Tensor

    from moespec.spec.schema import LayerSpec


def hash_table(vocab_size: int, n_experts: int, k: int, hash: str, seed: int) -> Tensor:
    """int64 [vocab_size, k]: the experts of each token id, a function of the arguments only.

    - ``random``: k = 1, each id draws its expert uniformly (``torch.randint`` from a CPU
      generator seeded with ``seed``); k > 1, each id draws k *distinct* experts (the first k
      of a random permutation: top-k of U(0, 1) [vocab_size, E]).
    - ``modulo``: expert ``(id + j) mod E`` for hash j = 0..k-1 (distinct since k <= E).
    """
    import torch  # the spec package itself does not need torch

    if hash == "modulo":
        ids_V1 = torch.arange(vocab_size, dtype=torch.int64, device="cpu")[:, None]
        return (ids_V1 + torch.arange(k, dtype=torch.int64, device="cpu")) % n_experts
    # On the CPU whatever the default device (``with torch.device("cuda")``): the same table
    # everywhere, drawn with a CPU generator.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if k == 1:
        return torch.randint(n_experts, (vocab_size, 1), generator=gen, dtype=torch.int64, device="cpu")
    u_VE = torch.rand(vocab_size, n_experts, generator=gen, device="cpu")
    return u_VE.topk(k, dim=-1).indices.to(torch.int64)


@ROUTERS.register
class HashRouter(RouterSpec):
    """Hash layers (Roller, Sukhbaatar, Szlam and Weston 2021, "Hash Layers For Large Sparse
    Models", arXiv:2106.04426): each token goes to the expert a fixed hash of its *token id*
    picks, h_t = FFN_{hash(x_t)}(h_t). No router parameters, no balance loss, no learned
    assignment; the layer takes ``input_ids`` (same shape as x without its last dim).

    The hash is a table [vocab_size, k] stored as the int64 buffer ``router.table`` (so it is
    in ``state_dict`` and checkpoints): ``random`` (a fixed uniform random assignment drawn
    from ``seed``; the paper's "Random Hash") or ``modulo`` (id mod E). The paper's best,
    "Balanced assignment", needs the training corpus's token frequencies and is not built
    in: write such a table into ``router.table`` after building. The paper weighs the chosen
    expert's output by nothing (weight 1). k > 1 routes each token to k distinct experts
    weighted 1/k each (an average); this is *not* the paper's MultiHash, which splits one
    FFN into k segments hashed independently and concatenates them.
    """

    kind: Literal["hash"] = Field(description="Fixed token-id hash routing (no router parameters).")
    vocab_size: int = Field(gt=0, description="Vocabulary size; input ids must lie in [0, vocab_size).")
    hash: Literal["random", "modulo"] = Field(
        "random",
        description="`random`: a fixed uniform random id -> expert table drawn from `seed`; "
        "`modulo`: expert = id mod E.",
    )
    seed: int = Field(0, ge=0, description="Seed of the random table (independent of the weights' seed).")
    k: int = Field(1, gt=0, description="Experts per token (distinct), each weighted 1/k.")

    def experts_per_token(self, layer: LayerSpec) -> float:
        return self.k

    def extra_inputs(self, layer: LayerSpec) -> tuple[ExtraInput, ...]:
        return (ExtraInput("input_ids"),)

    def router_macs(self, layer: LayerSpec, d_model: int) -> float:
        return 0  # a table lookup

    def params(self, layer: LayerSpec, d_model: int) -> dict[str, RouterParam]:
        n = layer.experts.n_routed
        value = partial(hash_table, self.vocab_size, n, self.k, self.hash, self.seed)
        return {"router.table": RouterParam((self.vocab_size, self.k), buffer=True, value=value)}

    def checks(self, layer: LayerSpec, at: Path) -> Iterator[Problem]:
        yield from at_most_routed(layer, at, "k", self.k)
        yield from unusable(
            layer,
            at,
            "losses.load_balance",
            "hash routing has no router to balance (its assignment is fixed); remove load_balance",
        )
        yield from unusable(layer, at, "losses.z_loss", "hash routing has no router logits; remove z_loss")
