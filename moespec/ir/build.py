"""Spec -> IR: resolve defaults, assign expert indices, expand placement; verify the result."""

from __future__ import annotations

import hashlib
import json

from moespec.ir.model_numbers import model_numbers
from moespec.ir.nodes import (
    AttentionNode,
    CombineNode,
    DenseFFNNode,
    DispatchNode,
    ExpertGroupNode,
    ExpertsNode,
    LossesNode,
    ModelNode,
    MoELayerNode,
    PlacementNode,
    Program,
    RouterNode,
    SharedNode,
    ZeroComputeNode,
)
from moespec.ir.numbers import expert_costs, layer_numbers
from moespec.ir.params import layer_params
from moespec.ir.verify import verify
from moespec.spec.network import block_plan, head_dim
from moespec.spec.schema import LayerSpec, Spec, inner_d_model


def spec_hash(spec: Spec) -> str:
    """SHA-256 of the canonical JSON of the resolved spec (the artifact's identity)."""
    canon = json.dumps(spec.model_dump(mode="json", exclude={"extends"}), sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def expert_to_rank(mapping: str | list[int], n_ffn: int, ep: int) -> tuple[int, ...]:
    """The rank of each routed FFN expert under a placement mapping."""
    if isinstance(mapping, list):
        return tuple(mapping)
    if mapping == "round_robin":
        return tuple(e % ep for e in range(n_ffn))
    per = n_ffn // ep
    return tuple(e // per for e in range(n_ffn))


def _experts(d_model: int, layer: LayerSpec, at: str) -> ExpertsNode:
    # d_model here is already the inner width (multi-head MoE: D / heads).
    groups, first = [], 0
    for g in layer.experts.routed:
        groups.append(ExpertGroupNode(g.kind, g.op_activation, g.width, g.n_experts, g.bias, g.init, first))
        first += g.n_experts
    zeros = []
    for z in layer.experts.zero_compute:
        zeros.append(ZeroComputeNode(z.kind, z.count, first))
        first += z.count
    sizes = tuple(p for p, _ in expert_costs(layer, d_model))
    return ExpertsNode(d_model, tuple(groups), tuple(zeros), f"{at}.experts", sizes)


def build_layer(spec: Spec, name: str, count: int, layer: LayerSpec, at: str) -> MoELayerNode:
    """Resolve one layer group into an :class:`MoELayerNode`."""
    d_inner = inner_d_model(layer, spec.d_model)
    experts = _experts(d_inner, layer, at)
    router_dtype = layer.router.own_dtype or spec.target.router_dtype
    r = layer.router
    router = RouterNode(
        r, d_inner, experts.n_experts, router_dtype, f"{at}.router", score=r.score_fn,
        nominal_k=r.nominal_k(layer), extra_inputs=r.extra_inputs(layer), causal=r.causal,
    )  # fmt: skip
    rows = layer.router.rows_per_token(layer)
    shared = None
    if (s := layer.experts.shared) is not None:
        shared = SharedNode(
            s.kind, s.op_activation, s.count * s.d_ff, s.bias, s.gate, s.init, f"{at}.experts.shared"
        )
    p = spec.placement
    return MoELayerNode(
        name=name,
        count=count,
        d_model=spec.d_model,
        dtype=spec.target.dtype,
        router=router,
        dispatch=DispatchNode(experts.n_experts, rows, layer.capacity, f"{at}.capacity"),
        experts=experts,
        shared=shared,
        combine=CombineNode(f"{at}"),
        losses=LossesNode(layer.losses.load_balance, layer.losses.z_loss, f"{at}.losses"),
        placement=PlacementNode(
            p.expert_parallel, expert_to_rank(p.mapping, experts.n_ffn, p.expert_parallel), "placement"
        ),
        numbers=layer_numbers(spec, name, count, layer),
        params=layer_params(layer, spec.d_model),
        schedules=tuple(layer.schedules),
        heads=layer.multi_head.heads if layer.multi_head is not None else 1,
        head_bias=layer.multi_head.bias if layer.multi_head is not None else False,
        backend=spec.target.backend,
    )


def build_model(spec: Spec) -> ModelNode | None:
    """The network node of a spec's `model:` section (None without one)."""
    m = spec.model
    if m is None:
        return None
    a = m.attention
    attention = AttentionNode(
        a.heads,
        a.kv_heads or a.heads,
        head_dim(spec),
        a.rope_theta,
        a.qk_norm,
        a.bias,
        m.kind == "decoder_lm",
    )
    dense = None
    if m.dense_ffn is not None:
        f = m.dense_ffn
        dense = DenseFFNNode(f.kind, f.activation, f.d_ff, f.bias)
    return ModelNode(
        kind=m.kind, d_model=spec.d_model, vocab_size=m.vocab_size, pad_token_id=m.pad_token_id,
        max_seq_len=m.max_seq_len,
        attention=attention, norm=m.norm.kind, norm_eps=m.norm.eps, dense_ffn=dense,
        blocks=tuple(block_plan(spec)),
        tie_embeddings=getattr(m, "tie_embeddings", False), pool=getattr(m, "pool", "mean"),
        classes=getattr(m, "classes", None), init_std=m.init_std, numbers=model_numbers(spec),
    )  # fmt: skip


def build_program(spec: Spec) -> Program:
    """The verified IR of a validated spec."""
    if spec.groups:
        items = [(g.name, g.count, g.layer, f"groups.{i}.layer") for i, g in enumerate(spec.groups)]
    else:
        items = [("layer", 1, spec.layer, "layer")]
    program = Program(
        name=spec.name,
        spec_hash=spec_hash(spec),
        d_model=spec.d_model,
        dtype=spec.target.dtype,
        device=spec.target.device,
        backend=spec.target.backend,
        arch=spec.target.arch,
        layers=tuple(build_layer(spec, n, c, lay, at) for n, c, lay, at in items),
        model=build_model(spec),
    )
    verify(program)
    return program
