"""Whole-network numbers (`model:` section) against hand-computed counts from the released
configs and against the published totals."""

from __future__ import annotations

from pathlib import Path

import pytest

from moespec.cli import main
from moespec.ir.model_numbers import model_numbers
from moespec.spec.load import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


def _count(vocab, d, blocks, heads, kv, hd, n_exp, k, d_ff, qk, tied=False):
    """(total, active) of a SwiGLU-MoE decoder written out from its config, term by term."""
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d + qk
    expert = 3 * d * d_ff
    router = d * n_exp
    norms = 2 * d
    per_block = attn + router + norms
    embed = vocab * d * (1 if tied else 2)
    total = blocks * (per_block + n_exp * expert) + embed + d
    active = blocks * (per_block + k * expert) + embed + d
    return total, active


# name: (hand count from config.json, published total, published active, active tolerance).
# The published active figures are rounded to two significant digits (Qwen: 3.35B -> "3.3B",
# OLMoE: 1.28B -> "1.3B"), so they are held to 2% and the exact counts pinned.
PUBLISHED = {
    "mixtral-8x7b": (_count(32000, 4096, 32, 32, 8, 128, 8, 2, 14336, 0), 46.7e9, 12.9e9, 0.01),
    "qwen3-30b-a3b": (_count(151936, 2048, 48, 32, 4, 128, 128, 8, 768, 2 * 128), 30.5e9, 3.3e9, 0.02),
    "olmoe-1b-7b": (_count(50304, 2048, 16, 16, 16, 128, 64, 8, 1024, 2 * 2048), 6.9e9, 1.3e9, 0.02),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name: str):
    (total, active), pub_total, pub_active, tol = PUBLISHED[name]
    n = model_numbers(load_spec(SPECS / f"{name}.yaml").spec)
    assert (n.params_total, n.params_active) == (total, active)
    assert abs(n.params_total / pub_total - 1) < 0.01
    assert abs(n.params_active / pub_active - 1) < tol


def test_mixtral_flops_and_memory():
    n = model_numbers(load_spec(SPECS / "mixtral-8x7b.yaml").spec, seq_len=4096)
    d, blocks, vocab = 4096, 32, 32000
    proj = d * 4096 + 2 * d * 1024 + 4096 * d + 8 * d + 2 * 3 * d * 14336  # attn + router + 2 experts
    scores = 2 * 32 * 128 * (4096 + 1) / 2  # causal: (S + 1) / 2 keys on average
    assert n.seq_len == 4096
    assert n.flops_per_token == 2 * (blocks * proj + vocab * d) + round(2 * blocks * scores)
    assert n.weight_bytes_per_rank == 2 * n.params_total  # bf16, one rank


def test_tied_encoder_and_layernorm_counts():
    spec = {
        "moespec": 1,
        "name": "enc",
        "d_model": 16,
        "layer": {
            "experts": {"routed": [{"count": 4, "kind": "mlp", "activation": "gelu", "d_ff": 8}]},
            "router": {"kind": "topk", "k": 1},
        },
        "model": {
            "kind": "encoder",
            "vocab_size": 10,
            "blocks": 2,
            "max_seq_len": 8,
            "classes": 3,
            "attention": {"heads": 2, "bias": True},
            "norm": {"kind": "layernorm"},
            "dense_ffn": {"kind": "mlp", "activation": "gelu", "d_ff": 32, "bias": True},
            "moe_blocks": {"kind": "list", "blocks": [1]},
        },
    }
    n = model_numbers(load_spec(spec).spec)
    attn = 4 * 16 * 16 + 4 * 16
    dense = 2 * 16 * 32 + 32 + 16
    moe = 16 * 4 + 4 * 2 * 16 * 8
    norms = 5 * 2 * 16
    assert n.params_total == 10 * 16 + 3 * 16 + 2 * attn + dense + moe + norms
    assert n.params_active == n.params_total - 3 * 2 * 16 * 8
    assert n.flops_attention_scores == 2 * 2 * (2 * 2 * 8 * 8)  # bidirectional: all 8 keys


def test_explain_prints_the_whole_model(capsys):
    assert main(["explain", str(SPECS / "olmoe-1b-7b.yaml"), "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "whole model (decoder_lm, 16 blocks, 16 MoE): 6,919,161,856 params" in out
    assert "1,282,017,280 active" in out and "sequence length 2,048" in out
    assert main(["explain", str(SPECS / "olmoe-1b-7b.yaml"), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["model"]["params_total"] == 6919161856 and data["model"]["seq_len"] == 4096
