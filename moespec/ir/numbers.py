"""Derived numbers of an MoE layer: parameters, active parameters, FLOPs/token, memory per rank.

Conventions (stated in the README and in ``moespec explain``):
- parameters are trainable weights and biases; buffers (the aux-loss-free expert bias) are not;
  active parameters are those used per token at inference (no training-only noise projection);
- FLOPs are forward matmul FLOPs at inference, 2 per multiply-accumulate; elementwise work
  (activations, softmax, bias adds, combine) and training-only noise projections are excluded;
- active parameters/FLOPs assume the router picks its k most expensive experts, which is exact
  for homogeneous experts and an upper bound for heterogeneous ones and zero-compute experts;
- weight memory per expert-parallel rank holds 1/ep of the routed FFN experts plus a replica of
  everything else (router with its buffers, shared experts, zero-compute experts), in
  ``target.dtype``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moespec.spec.base import BYTES_PER_DTYPE
from moespec.spec.experts import FFNSpec
from moespec.spec.routers.base import numel
from moespec.spec.schema import LayerSpec, Spec, inner_d_model


def ffn_macs(kind: str, d: int, f: int) -> int:
    """Multiply-accumulates per token of one FFN block (= its weight-matrix entries)."""
    return (3 if kind == "glu" else 2) * d * f


def ffn_params(ffn: FFNSpec, d: int, width: int | None = None) -> int:
    """Weights (+ biases) of one FFN block of hidden width ``width`` (default ``ffn.d_ff``)."""
    f = ffn.d_ff if width is None else width
    bias = ((2 * f if ffn.kind == "glu" else f) + d) if ffn.bias else 0
    return ffn_macs(ffn.kind, d, f) + bias


def _top_k_sum(values: list[int], k: float) -> float:
    """Sum of the ``k`` largest values; a fractional k takes that fraction of the next one."""
    top = sorted(values, reverse=True)
    whole = min(int(k), len(top))
    rest = top[whole] * (k - whole) if whole < len(top) else 0
    return sum(top[:whole]) + rest


def expert_costs(layer: LayerSpec, d: int) -> list[tuple[int, int]]:
    """(parameters, MACs per token) of each routed expert at width ``d``, in expert-index
    order: FFN groups, then zero-compute experts (a constant expert has 3·D parameters)."""
    out: list[tuple[int, int]] = []
    for g in layer.experts.routed:
        out += [(ffn_params(g, d, g.width), ffn_macs(g.kind, d, g.width))] * g.n_experts
    for z in layer.experts.zero_compute:
        out += [(3 * d, 2 * d) if z.kind == "constant" else (0, 0)] * z.count
    return out


def expert_sizes(layer: LayerSpec, d_model: int) -> tuple[int, ...]:
    """Parameters of each routed expert at the layer's inner width (the parameter penalty's
    weights)."""
    return tuple(p for p, _ in expert_costs(layer, inner_d_model(layer, d_model)))


@dataclass(frozen=True)
class LayerNumbers:
    """Derived numbers of one MoE layer (one member of a group)."""

    name: str
    count: int
    n_experts: int
    n_ffn_experts: int
    experts_per_token: float
    params_total: int
    params_active: int
    flops_per_token: int
    params_router: int
    params_routed: int
    params_shared: int
    params_zero_compute: int
    weight_bytes_per_rank: int

    def to_json(self) -> dict[str, object]:
        """Plain dict for ``--json`` output."""
        return asdict(self)


def layer_numbers(spec: Spec, name: str, count: int, layer: LayerSpec) -> LayerNumbers:
    """Compute :class:`LayerNumbers` for one layer of ``spec``."""
    # Multi-head MoE: router and experts work on `heads` sub-tokens of width D/heads per token.
    heads = layer.multi_head.heads if layer.multi_head is not None else 1
    d, ex = inner_d_model(layer, spec.d_model), layer.experts
    n = ex.n_routed
    router = layer.router
    router_active = router.active_router_params(layer, d)
    router_params = sum(numel(p.shape) for p in router.params(layer, d).values() if not p.buffer)
    per_expert = expert_costs(layer, d)
    routed = sum(p for p, _ in per_expert[: ex.n_ffn])
    zero = sum(p for p, _ in per_expert[ex.n_ffn :])
    shared, shared_macs = 0, 0
    if ex.shared is not None:
        shared = ex.shared.count * ffn_params(ex.shared, d) + (d if ex.shared.gate else 0)
        shared_macs = ex.shared.count * ffn_macs(ex.shared.kind, d, ex.shared.d_ff)
        shared_macs += d if ex.shared.gate else 0
    k = router.experts_per_token(layer)
    # Each of a token's `heads` sub-tokens picks its own k experts: up to heads·k distinct ones.
    active_p = _top_k_sum([p for p, _ in per_expert], min(heads * k, len(per_expert)))
    active_m = _top_k_sum([m for _, m in per_expert], k)
    proj = 0  # multi-head projections W_in, W_out (+ biases), replicated like the router
    if layer.multi_head is not None:
        big = spec.d_model
        proj = 2 * big * big + (2 * big if layer.multi_head.bias else 0)
    total = router_params + routed + shared + zero + proj
    ep = spec.placement.expert_parallel
    # Memory holds every router tensor, frozen (buffer) ones included.
    router_all = sum(numel(p.shape) for p in router.params(layer, d).values())
    per_rank = routed // ep + router_all + shared + zero + proj
    return LayerNumbers(
        name=name,
        count=count,
        n_experts=n,
        n_ffn_experts=ex.n_ffn,
        experts_per_token=k,
        params_total=total,
        params_active=round(router_active + shared + active_p + proj),
        flops_per_token=round(
            2
            * (
                heads * (router.router_macs(layer, d) + shared_macs + active_m)
                + (proj and 2 * spec.d_model**2)
            )
        ),
        params_router=router_params,
        params_routed=routed,
        params_shared=shared,
        params_zero_compute=zero,
        weight_bytes_per_rank=per_rank * BYTES_PER_DTYPE[spec.target.dtype],
    )


def spec_numbers(spec: Spec) -> list[LayerNumbers]:
    """Numbers for each layer group of ``spec``."""
    return [layer_numbers(spec, name, count, layer) for name, count, layer in spec.layer_groups()]
