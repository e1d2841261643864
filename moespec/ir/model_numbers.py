"""Derived numbers of a whole network (a spec's `model:` section): parameters, active
parameters, FLOPs per token and weight memory, with the MoE blocks' share from
:mod:`moespec.ir.numbers`.

Conventions, beyond those of the layer numbers:
- parameters count the token embedding, the LM (or class) head unless tied, every norm's
  weight (and LayerNorm's bias), attention projections (and biases), QK-norm weights, dense
  FFNs and the MoE layers; RoPE has no parameters;
- active parameters are the parameters a token uses: everything but the MoE layers' unused
  experts (the embedding row a token reads counts as the whole embedding, as published
  totals do);
- FLOPs per token are forward matmul FLOPs (2 per multiply-accumulate) of every projection,
  the head (not the embedding lookup) and attention's two products, q·kᵀ and p·v, at
  sequence length ``seq_len``: a causal token attends to (seq_len + 1) / 2 keys on average,
  an encoder token to seq_len;
- weight memory is per expert-parallel rank, in ``target.dtype``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moespec.ir.numbers import LayerNumbers, ffn_params, spec_numbers
from moespec.spec.base import BYTES_PER_DTYPE
from moespec.spec.network import block_plan, head_dim
from moespec.spec.schema import Spec


@dataclass(frozen=True)
class ModelNumbers:
    """Derived numbers of the network of a spec with a `model:` section."""

    kind: str
    blocks: int
    moe_blocks: int
    seq_len: int
    params_total: int
    params_active: int
    flops_per_token: int
    weight_bytes_per_rank: int
    params_embedding: int
    params_head: int
    params_attention: int
    params_norms: int
    params_dense_ffn: int
    params_moe: int
    params_moe_active: int
    flops_attention_scores: int

    def to_json(self) -> dict[str, object]:
        """Plain dict for ``--json`` output."""
        return asdict(self)


def attention_params(spec: Spec) -> int:
    """q, k, v and output projections (+ biases) and QK-norm weights of one block."""
    assert spec.model is not None
    a, d = spec.model.attention, spec.d_model
    hd, kv = head_dim(spec), a.kv_heads or a.heads
    q, k = a.heads * hd, kv * hd
    params = d * (q + 2 * k) + q * d + ((q + 2 * k + d) if a.bias else 0)
    qk = {"none": 0, "head": 2 * hd, "full": q + k}[a.qk_norm]
    return params + qk


def model_numbers(spec: Spec, seq_len: int | None = None) -> ModelNumbers:
    """:class:`ModelNumbers` of ``spec``'s network, attention FLOPs at ``seq_len`` tokens
    (default: ``model.max_seq_len``)."""
    m = spec.model
    assert m is not None, "model_numbers needs a spec with a `model:` section"
    d, s = spec.d_model, seq_len or m.max_seq_len
    norm = d * (2 if m.norm.kind == "layernorm" else 1)
    embedding = m.vocab_size * d
    head_out = m.vocab_size if m.kind == "decoder_lm" else (m.classes or 0)
    head = 0 if (m.kind == "decoder_lm" and m.tie_embeddings) else head_out * d
    attn = attention_params(spec)
    dense = ffn_params(m.dense_ffn, d) if m.dense_ffn is not None else 0  # type: ignore[arg-type]
    dense_macs = 0
    if m.dense_ffn is not None:
        dense_macs = (3 if m.dense_ffn.kind == "glu" else 2) * d * m.dense_ffn.d_ff
    layers: dict[str, LayerNumbers] = {n.name: n for n in spec_numbers(spec)}
    plan = block_plan(spec)
    moe = [layers[name] for name in plan if name is not None]
    n_dense = len(plan) - len(moe)
    a = m.attention
    hd = head_dim(spec)
    q, k = a.heads * hd, (a.kv_heads or a.heads) * hd
    attn_macs = d * (q + 2 * k) + q * d
    keys = (s + 1) / 2 if m.kind == "decoder_lm" else s
    scores_macs = round(2 * a.heads * hd * keys)  # q·kᵀ and p·v per query
    norms = (2 * m.blocks + 1) * norm
    # Tied: the head's matmul still runs; only its parameters are shared with the embedding.
    head_macs = head_out * d
    params_moe = sum(n.params_total for n in moe)
    params_moe_active = sum(n.params_active for n in moe)
    shared = embedding + head + m.blocks * attn + norms + n_dense * dense
    bytes_per = BYTES_PER_DTYPE[spec.target.dtype]
    flops = 2 * (m.blocks * (attn_macs + scores_macs) + n_dense * dense_macs + head_macs)
    return ModelNumbers(
        kind=m.kind,
        blocks=m.blocks,
        moe_blocks=len(moe),
        seq_len=s,
        params_total=shared + params_moe,
        params_active=shared + params_moe_active,
        flops_per_token=flops + sum(n.flops_per_token for n in moe),
        weight_bytes_per_rank=shared * bytes_per + sum(n.weight_bytes_per_rank for n in moe),
        params_embedding=embedding,
        params_head=head,
        params_attention=m.blocks * attn,
        params_norms=norms,
        params_dense_ffn=n_dense * dense,
        params_moe=params_moe,
        params_moe_active=params_moe_active,
        flops_attention_scores=2 * m.blocks * scores_macs,
    )
