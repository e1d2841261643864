"""The dense parts of a network (a spec's `model:` section) in plain torch: norms, rotary
position embeddings, self-attention and the dense FFN. The MoE parts are :class:`MoELayer`.

Shapes: B batch, S sequence, D d_model, H query heads, G key/value heads, Dh head width.
Parameter names follow the transformers convention where there is one (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``, ``k_norm``, ``gate_proj``, ``up_proj``,
``down_proj``), so checkpoint converters stay tables of renames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moespec.ir.nodes import AttentionNode, DenseFFNNode

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
    "silu": F.silu,
}


def make_norm(kind: str, eps: float, width: int) -> nn.Module:
    """RMSNorm (weight only) or LayerNorm (weight and bias) over the last ``width`` features."""
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=eps)
    return nn.LayerNorm(width, eps=eps)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin [max_len, head_dim] of RoPE (Su et al. 2021) in the rotate-half layout
    (feature i pairs with i + head_dim/2, frequency theta^(-2i/head_dim)), in fp32."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x_BHSDh: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin, computed in fp32 and cast back."""
    x = x_BHSDh.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos_SDh + rotated * sin_SDh).to(x_BHSDh.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with GQA, optional QK-norm and RoPE, run by
    ``F.scaled_dot_product_attention`` (causal for a decoder)."""

    def __init__(self, spec: AttentionNode, d_model: int, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, spec.head_dim
        self.causal, self.qk_norm = spec.causal, spec.qk_norm
        head_dim = spec.head_dim
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        self.q_proj = nn.Linear(d_model, q, bias=spec.bias)
        self.k_proj = nn.Linear(d_model, kv, bias=spec.bias)
        self.v_proj = nn.Linear(d_model, kv, bias=spec.bias)
        self.o_proj = nn.Linear(q, d_model, bias=spec.bias)
        if spec.qk_norm != "none":
            # `head`: one weight of width Dh shared by every head (Qwen3); `full`: over the
            # whole projection (OLMoE).
            self.q_norm = nn.RMSNorm(head_dim if spec.qk_norm == "head" else q, eps=eps)
            self.k_norm = nn.RMSNorm(head_dim if spec.qk_norm == "head" else kv, eps=eps)

    def forward(self, x_BSD: Tensor, cos_SDh: Tensor, sin_SDh: Tensor) -> Tensor:
        b, s, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSDh = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k_BGSDh = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v_BGSDh = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q_BHSDh, k_BGSDh = self.q_norm(q_BHSDh), self.k_norm(k_BGSDh)
        q_BHSDh = apply_rope(q_BHSDh, cos_SDh, sin_SDh)
        k_BGSDh = apply_rope(k_BGSDh, cos_SDh, sin_SDh)
        if self.kv_heads != self.heads:  # GQA: each key/value head serves heads/kv_heads queries
            rep = self.heads // self.kv_heads
            k_BGSDh, v_BGSDh = k_BGSDh.repeat_interleave(rep, 1), v_BGSDh.repeat_interleave(rep, 1)
        o_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=self.causal)
        return self.o_proj(o_BHSDh.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class DenseFFN(nn.Module):
    """``mlp``: down(act(up(x))); ``glu``: down(act(gate(x)) * up(x))."""

    def __init__(self, spec: DenseFFNNode, d_model: int) -> None:
        super().__init__()
        self.act = ACTIVATIONS[spec.activation]
        self.glu = spec.kind == "glu"
        if self.glu:
            self.gate_proj = nn.Linear(d_model, spec.d_ff, bias=spec.bias)
        self.up_proj = nn.Linear(d_model, spec.d_ff, bias=spec.bias)
        self.down_proj = nn.Linear(spec.d_ff, d_model, bias=spec.bias)

    def forward(self, x_BSD: Tensor) -> Tensor:
        h = (
            self.act(self.gate_proj(x_BSD)) * self.up_proj(x_BSD)
            if self.glu
            else self.act(self.up_proj(x_BSD))
        )
        return self.down_proj(h)
