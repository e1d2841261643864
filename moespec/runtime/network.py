"""The network of a spec with a `model:` section: embedding, pre-norm blocks of attention and
an FFN (dense or a moespec :class:`MoELayer`), final norm and head.

``forward(input_ids, labels=None)`` returns a :class:`NetworkOutput`: the logits and, with
labels, the loss = cross-entropy + the MoE blocks' auxiliary losses (both also apart). A
decoder LM predicts token t+1 from tokens ..t (labels are the input ids, shifted inside, as
transformers does; -100 is ignored); an encoder pools its last hidden states (mean or first
token) and, with ``classes``, classifies them (labels [B] class ids).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moespec.common.dtypes import TORCH_DTYPES
from moespec.errors import BuildError
from moespec.ir.build import build_program
from moespec.ir.nodes import Program
from moespec.runtime.blocks import Attention, DenseFFN, make_norm, rope_tables
from moespec.runtime.carry import State, check_suppliable, layer_inputs, publish
from moespec.runtime.layer import MoELayer
from moespec.runtime.memory import check_fits
from moespec.runtime.target import check_runnable
from moespec.spec.schema import Spec

IGNORE_INDEX = -100


class NetworkOutput(NamedTuple):
    """What a network's forward returns; the losses are None without labels."""

    logits: Tensor
    loss: Tensor | None = None
    ce_loss: Tensor | None = None
    aux_loss: Tensor | None = None


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)); ``ffn`` is dense or an :class:`MoELayer`."""

    def __init__(self, attn: Attention, ffn: nn.Module, attn_norm: nn.Module, ffn_norm: nn.Module) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor, state: State) -> Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
        h = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h, **layer_inputs(self.ffn, state))
            publish(self.ffn, state)
        else:
            out = self.ffn(h)
        return x_BSD + out


class MoENetwork(nn.Module):
    """The network a spec's `model:` section describes (see the module docstring)."""

    def __init__(self, program: Program, *, seed: int = 0, generator: torch.Generator | None = None) -> None:
        """The network of ``program.model`` (built from the IR alone), weights drawn from
        ``seed`` (dense parts: N(0, init_std²), norms 1, biases 0; each MoE block from its own
        seed drawn from it, by the layer's spec init); ``generator`` drives the MoE layers'
        jitter, noise and random policies."""
        super().__init__()
        m = program.model
        assert m is not None, "MoENetwork needs a program with a model"
        object.__setattr__(self, "ir", m)
        self.kind, self.d_model, self.max_seq_len = m.kind, m.d_model, m.max_seq_len
        self.dtype = TORCH_DTYPES[program.dtype]
        init = torch.Generator().manual_seed(seed)
        layers = {lay.name: lay for lay in program.layers}
        d = m.d_model
        # padding_idx: the padding row's gradient is zero (and _init_dense leaves the row zero).
        self.embed_tokens = nn.Embedding(m.vocab_size, d, padding_idx=m.pad_token_id)
        blocks = []
        for i, name in enumerate(m.blocks):
            attn = Attention(m.attention, d, m.norm_eps)
            if name is None:
                assert m.dense_ffn is not None
                ffn: nn.Module = DenseFFN(m.dense_ffn, d)
            else:
                layer_seed = int(torch.randint(0, 2**62, (), generator=init))
                ffn = MoELayer(layers[name], seed=layer_seed, generator=generator)
                check_suppliable(ffn, f"block {i} ({name})")
            norms = make_norm(m.norm, m.norm_eps, d), make_norm(m.norm, m.norm_eps, d)
            blocks.append(Block(attn, ffn, *norms))
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(m.norm, m.norm_eps, d)
        out = m.vocab_size if m.kind == "decoder_lm" else m.classes
        self.tied = m.kind == "decoder_lm" and m.tie_embeddings
        if out and not self.tied:
            self.lm_head = nn.Linear(d, out, bias=False)
        self._init_dense(init, m.init_std)
        self.to(self.dtype)
        # After the cast: the rotary tables stay fp32 (they are recomputed, never saved).
        cos, sin = rope_tables(m.attention.head_dim, m.max_seq_len, m.attention.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def _init_dense(self, gen: torch.Generator, std: float) -> None:
        """Every parameter outside the MoE layers, in module order (deterministic in seed)."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
                if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                    mod.weight[mod.padding_idx].zero_()

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE blocks' layers, in block order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def aux_loss(self) -> Tensor:
        """Sum of the MoE blocks' auxiliary losses of the last forward (weighted, with gradient)."""
        losses = [lay.aux_loss for lay in self.moe_layers if lay.aux_loss is not None]
        return torch.stack([a.float() for a in losses]).sum() if losses else torch.zeros(())

    def hidden(self, input_ids: Tensor) -> Tensor:
        """The final-norm hidden states [B, S, D] of ``input_ids`` [B, S]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        s = input_ids.shape[1]
        if s > self.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        state: State = {"input_ids": input_ids}
        for block in self.blocks:
            x = block(x, cos, sin, state)
        return self.norm(x)

    def head(self, h: Tensor) -> Tensor:
        """Logits from the final hidden states: the LM head (or the tied embedding); for an
        encoder, of the pooled states (the pooled states themselves without ``classes``)."""
        if self.kind == "encoder":
            h = h.mean(dim=1) if self.ir.pool == "mean" else h[:, 0]
        if self.tied:
            return F.linear(h, self.embed_tokens.weight)
        return self.lm_head(h) if hasattr(self, "lm_head") else h

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> NetworkOutput:
        logits = self.head(self.hidden(input_ids))
        if labels is None:
            return NetworkOutput(logits)
        if self.kind == "decoder_lm":
            pred, target = logits[:, :-1], labels[:, 1:]
        else:
            pred, target = logits, labels
        ce = F.cross_entropy(
            pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX
        )
        aux = self.aux_loss()
        return NetworkOutput(logits, ce + aux, ce, aux)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding (decoder LM): append the argmax token ``max_new_tokens`` times; the
        context is cut to the last ``max_seq_len`` tokens (no key/value cache)."""
        if self.kind != "decoder_lm":
            raise ValueError("generate needs a decoder_lm network")
        was = self.training
        self.eval()
        try:
            ids = input_ids
            for _ in range(max_new_tokens):
                logits = self(ids[:, -self.max_seq_len :]).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return ids
        finally:
            self.train(was)

    def extra_repr(self) -> str:
        n_moe = len(self.moe_layers)
        return f"kind={self.kind!r}, d_model={self.d_model}, blocks={len(self.blocks)}, moe_blocks={n_moe}"


def build_network(
    spec: Spec,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    allow_large: bool = False,
    artifact: bool = False,
) -> MoENetwork:
    """The network of ``spec`` (which has a `model:` section) on ``device`` (``target.device``
    when None; the target checks and the memory check as for a layer). ``artifact``: it is
    only written out (no kernel runs, as for :func:`moespec.runtime.build.build_layer`)."""
    if spec.model is None:
        raise BuildError("the spec has no `model:` section; build a layer instead")
    program = build_program(spec)
    dev = check_runnable(program, device, kernels=not artifact)
    assert program.model is not None
    numbers = program.model.numbers
    # Weights in the target dtype, plus one fp32 tensor drawn at a time (the largest).
    largest = max(numbers.params_embedding, numbers.params_head) * 4
    check_fits(
        f"the {spec.model.kind} network of {spec.name!r} ({numbers.params_total:,} parameters, "
        f"{spec.target.dtype})",
        numbers.params_total * TORCH_DTYPES[spec.target.dtype].itemsize + largest,
        allow_large=allow_large,
        hint="scale it down with overrides (model.blocks=..., d_model=..., model.vocab_size=...)",
    )
    return MoENetwork(program, seed=seed, generator=generator).to(dev)


def param_count(module: nn.Module) -> int:
    """Trainable parameters of ``module`` (shared tensors once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["IGNORE_INDEX", "MoENetwork", "NetworkOutput", "build_network", "param_count"]
