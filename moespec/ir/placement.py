"""What expert parallelism puts on each rank, and what it sends (torch-free, for ``explain``).

Per layer with ``placement.expert_parallel`` = W > 1:
- each rank's routed FFN experts (under the spec's mapping), their parameters and the rank's
  weight bytes (its routed experts plus a replica of everything else, in ``target.dtype``);
- the expected all-to-all bytes per rank for T tokens on that rank: each token sends k rows of
  width D out (dispatch) and gets them back (combine); under balanced routing a fraction
  (W-1)/W of the rows leave the rank. Forward: 2 · T · k · D · bytes · (W-1)/W; a training step
  doubles it (the backward exchanges the gradients the same way);
- a warning when the ranks' routed weights differ by more than 10% (experts of different
  widths on different ranks), since the largest rank bounds memory and step time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moespec.ir.build import expert_to_rank
from moespec.ir.numbers import expert_costs, layer_numbers
from moespec.spec.base import BYTES_PER_DTYPE
from moespec.spec.schema import Spec, inner_d_model

UNBALANCED = 1.10  # max/min routed weights per rank above which explain warns


@dataclass(frozen=True)
class RankShare:
    """One rank's routed FFN experts and weights."""

    rank: int
    experts: tuple[int, ...]
    routed_params: int
    weight_bytes: int


@dataclass(frozen=True)
class PlacementNumbers:
    """Expert parallelism of one layer group."""

    name: str
    expert_parallel: int
    tokens_per_rank: int
    ranks: tuple[RankShare, ...]
    all_to_all_bytes_forward: int
    all_to_all_bytes_train_step: int
    warning: str | None

    def to_json(self) -> dict[str, object]:
        """Plain dict for ``--json`` output."""
        return asdict(self)


def placement_numbers(spec: Spec, tokens_per_rank: int = 4096) -> list[PlacementNumbers]:
    """:class:`PlacementNumbers` of each layer group (none when ``expert_parallel`` is 1)."""
    p, out = spec.placement, []
    if p.expert_parallel == 1:
        return out
    width = BYTES_PER_DTYPE[spec.target.dtype]
    for name, count, layer in spec.layer_groups():
        d = inner_d_model(layer, spec.d_model)
        costs = expert_costs(layer, d)
        n_ffn = sum(g.n_experts for g in layer.experts.routed)
        owner = expert_to_rank(p.mapping, n_ffn, p.expert_parallel)
        numbers = layer_numbers(spec, name, count, layer)
        replicated = numbers.weight_bytes_per_rank - (numbers.params_routed // p.expert_parallel) * width
        ranks = []
        for r in range(p.expert_parallel):
            mine = tuple(e for e in range(n_ffn) if owner[e] == r)
            routed = sum(costs[e][0] for e in mine)
            ranks.append(RankShare(r, mine, routed, replicated + routed * width))
        heads = layer.multi_head.heads if layer.multi_head is not None else 1
        rows = tokens_per_rank * heads * numbers.experts_per_token
        leave = (p.expert_parallel - 1) / p.expert_parallel
        forward = round(2 * rows * d * width * leave)
        most, least = max(r.routed_params for r in ranks), min(r.routed_params for r in ranks)
        warning = None
        if most > UNBALANCED * max(least, 1):
            warning = (
                f"layer {name!r}: ranks hold unequal routed weights ({least:,} to {most:,} parameters); "
                "the largest rank bounds memory and step time: spread experts of each width over all ranks"
            )
        out.append(
            PlacementNumbers(
                name, p.expert_parallel, tokens_per_rank, tuple(ranks), forward, 2 * forward, warning
            )
        )
    return out
