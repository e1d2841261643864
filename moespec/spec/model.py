"""The optional `model:` section: a whole network around the spec's MoE layers.

`kind: decoder_lm` is a pre-norm decoder-only language model (token embedding, blocks of
causal self-attention + FFN, final norm, LM head); `kind: encoder` is the same stack with
bidirectional attention and a pooled (mean or first-token) output, optionally classified.
Each block's FFN is either the dense `dense_ffn` or an MoE layer (the spec's `layer` or one
of its `groups`); `moe_blocks` says which blocks are MoE and `moe_layers` which design each
uses. Without a `model:` section a spec describes one MoE layer, as before.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from moespec.spec.base import Strict
from moespec.spec.experts import Activation


class AttentionSpec(Strict):
    """Multi-head self-attention with rotary position embeddings (RoPE, Su et al. 2021,
    arXiv:2104.09864) and grouped-query attention (GQA, Ainslie et al. 2023, arXiv:2305.13245),
    run by ``F.scaled_dot_product_attention``. Causal in a decoder, bidirectional in an encoder."""

    heads: int = Field(gt=0, description="Query heads.")
    kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads (GQA); must divide `heads`. Default: `heads` (plain MHA)."
    )
    head_dim: int | None = Field(
        None, gt=0, description="Width of one head. Default: d_model / heads (which must then divide)."
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency θ.")
    qk_norm: Literal["none", "head", "full"] = Field(
        "none",
        description="RMSNorm on queries and keys before RoPE: `head` normalises each head over "
        "head_dim (Qwen3), `full` the whole projection (OLMoE), `none` neither.",
    )
    bias: bool = Field(False, description="Whether the q, k, v and output projections carry biases.")


class NormSpec(Strict):
    """The normalisation before each sub-block and before the output (pre-norm)."""

    kind: Literal["rmsnorm", "layernorm"] = Field(
        description="`rmsnorm` (Zhang & Sennrich 2019; a weight, no bias) or `layernorm` (weight and bias)."
    )
    eps: float = Field(1e-5, gt=0, description="Added to the variance for numerical stability.")


class DenseFFNSpec(Strict):
    """The feed-forward block of the blocks that are not MoE."""

    kind: Literal["mlp", "glu"] = Field(description="`mlp` (two matrices) or `glu` (three, gated).")
    activation: Activation = Field(description="Activation function (the gate's, for `glu`).")
    d_ff: int = Field(gt=0, description="Hidden width of the block.")
    bias: bool = Field(False, description="Whether the projections carry biases.")


class AllMoE(Strict):
    """Every block is MoE."""

    kind: Literal["all"] = Field(description="Every block is an MoE block.")


class EveryMoE(Strict):
    """Every `every`-th block is MoE, starting at block `offset` (GShard and Switch: every 2)."""

    kind: Literal["every"] = Field(
        description="Block i is MoE when i >= offset and (i - offset) % every == 0."
    )
    every: int = Field(gt=0, description="Period of the MoE blocks.")
    offset: int = Field(0, ge=0, description="Index of the first MoE block (0-based).")


class FirstDenseMoE(Strict):
    """The first `count` blocks are dense, the rest MoE (DeepSeek-V3: 3)."""

    kind: Literal["first_dense"] = Field(description="The first `count` blocks dense, all later ones MoE.")
    count: int = Field(ge=0, description="Number of leading dense blocks.")


class ListMoE(Strict):
    """An explicit list of the MoE blocks' indices."""

    kind: Literal["list"] = Field(description="The MoE blocks are the listed indices.")
    blocks: list[int] = Field(min_length=1, description="0-based indices of the MoE blocks, increasing.")


MoEBlocks = Annotated[Union[AllMoE, EveryMoE, FirstDenseMoE, ListMoE], Field(discriminator="kind")]  # noqa: UP007


def moe_block_indices(pattern: AllMoE | EveryMoE | FirstDenseMoE | ListMoE, n_blocks: int) -> list[int]:
    """0-based indices of the MoE blocks among ``n_blocks`` (out-of-range list entries are
    reported by the semantic checks, and dropped here)."""
    if isinstance(pattern, AllMoE):
        return list(range(n_blocks))
    if isinstance(pattern, EveryMoE):
        return list(range(pattern.offset, n_blocks, pattern.every))
    if isinstance(pattern, FirstDenseMoE):
        return list(range(pattern.count, n_blocks))
    return [i for i in pattern.blocks if 0 <= i < n_blocks]


class _ModelBase(Strict):
    """What a decoder and an encoder share: sizes, attention, norm, FFNs and the MoE pattern."""

    vocab_size: int = Field(gt=0, description="Vocabulary size (rows of the token embedding).")
    pad_token_id: int | None = Field(
        None,
        ge=0,
        description="The padding token's embedding row: zero at init and never updated (its gradient "
        "is zero), as `nn.Embedding(padding_idx=...)` and transformers' models do. Must be below "
        "`vocab_size`. None: no padding row.",
    )
    blocks: int = Field(gt=0, description="Number of transformer blocks.")
    max_seq_len: int = Field(
        gt=0,
        description="Longest sequence the model takes; also the sequence length at which "
        "`explain` states the attention FLOPs.",
    )
    attention: AttentionSpec = Field(description="Self-attention of every block.")
    norm: NormSpec = Field(description="Normalisation (pre-norm, and before the output).")
    dense_ffn: DenseFFNSpec | None = Field(
        None, description="FFN of the blocks that are not MoE; required when there are any."
    )
    moe_blocks: MoEBlocks = Field(
        default_factory=lambda: AllMoE(kind="all"),
        description="Which blocks are MoE: `all`, `every` (with `offset`), `first_dense` or a `list`.",
    )
    moe_layers: list[str] | None = Field(
        None,
        description="The layer design of each MoE block in order: `layer` or a group name. Default: "
        "the `groups` in order, each `count` times (their counts must add up to the MoE blocks), "
        "or `layer` for every MoE block when there are no groups.",
    )
    init_std: float = Field(0.02, gt=0, description="Std of the normal init of embeddings and dense weights.")

    def moe_indices(self) -> list[int]:
        """0-based indices of the MoE blocks."""
        return moe_block_indices(self.moe_blocks, self.blocks)


class DecoderLMSpec(_ModelBase):
    """A pre-norm decoder-only language model: embedding, `blocks` × (x + attn(norm(x)),
    x + ffn(norm(x))) with causal attention, final norm, LM head; next-token cross-entropy."""

    kind: Literal["decoder_lm"] = Field(description="A decoder-only language model.")
    tie_embeddings: bool = Field(
        False, description="Whether the LM head shares the token embedding's weight."
    )


class EncoderSpec(_ModelBase):
    """A pre-norm bidirectional encoder (the shape of Soft MoE's and the vision MoEs' towers):
    embedding, `blocks` × (x + attn(norm(x)), x + ffn(norm(x))), final norm, pooled over the
    sequence and, with `classes`, classified; cross-entropy against class labels."""

    kind: Literal["encoder"] = Field(description="A bidirectional encoder with a pooled output.")
    pool: Literal["mean", "first"] = Field(
        "mean", description="Pool by the mean over tokens or the first token."
    )
    classes: int | None = Field(
        None, gt=1, description="Classes of the linear head on the pooled output; none: the pooled output."
    )


Model = Annotated[Union[DecoderLMSpec, EncoderSpec], Field(discriminator="kind")]  # noqa: UP007
