"""The network of a `model:` section: sizes against explain's numbers, attention against a
naive loop, the loss against a hand-written cross-entropy, causality, cross-layer routing
state (MoE++'s gating residual, hash routing's input_ids) against a hand-run block loop,
greedy generation, schedules and torch.compile."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec.ir.model_numbers import model_numbers
from moespec.ir.nodes import AttentionNode
from moespec.runtime.blocks import Attention, rope_tables
from moespec.runtime.layer import MoELayer
from moespec.runtime.network import MoENetwork, param_count
from moespec.spec.load import load_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"

TINY = {
    "moespec": 1,
    "name": "net",
    "d_model": 16,
    "layer": {
        "experts": {"routed": [{"count": 4, "kind": "glu", "activation": "silu", "d_ff": 8}]},
        "router": {"kind": "topk", "k": 2},
        "losses": {"load_balance": {"kind": "switch", "weight": 0.1}},
    },
    "model": {
        "kind": "decoder_lm",
        "vocab_size": 11,
        "blocks": 3,
        "max_seq_len": 12,
        "attention": {"heads": 4, "kv_heads": 2},
        "norm": {"kind": "rmsnorm"},
        "dense_ffn": {"kind": "mlp", "activation": "gelu", "d_ff": 8},
        "moe_blocks": {"kind": "every", "every": 2},
    },
}


def _spec(**model) -> dict:
    data = copy.deepcopy(TINY)
    data["model"].update(model)
    return data


def _ids(b: int = 2, s: int = 7, vocab: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"tie_embeddings": True},
        {"attention": {"heads": 2, "qk_norm": "full", "bias": True}},
        {"attention": {"heads": 4, "head_dim": 6, "qk_norm": "head"}, "norm": {"kind": "layernorm"}},
        {"kind": "encoder", "classes": 3, "dense_ffn": {"kind": "glu", "activation": "relu", "d_ff": 8}},
        {"kind": "encoder"},
    ],
)
def test_parameters_match_explain(change):
    data = _spec(**change)
    net = moespec.build(data)
    assert isinstance(net, MoENetwork)
    n = model_numbers(load_spec(data).spec)
    assert param_count(net) == n.params_total
    moe = [b.ffn for b in net.blocks]
    assert [isinstance(f, MoELayer) for f in moe] == [True, False, True]


def _naive_attention(attn: Attention, x: torch.Tensor, theta: float, causal: bool) -> torch.Tensor:
    """Per (batch, head, query): RoPE as a complex rotation of the pairs (i, i + Dh/2), scores,
    mask, softmax, weighted values; the query head h reads key/value head h // (H/G)."""
    b, s, _ = x.shape
    h, g, dh = attn.heads, attn.kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, s, h, dh)
    k = attn.k_proj(x).view(b, s, g, dh)
    v = attn.v_proj(x).view(b, s, g, dh)
    if attn.qk_norm == "head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    half = dh // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / dh)

    def rotate(t, pos):
        z = torch.complex(t[..., :half].double(), t[..., half:].double())
        z = z * torch.exp(1j * pos * freq)
        return torch.cat([z.real, z.imag], -1).float()

    out = torch.zeros(b, s, h, dh)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(s):
                qi = rotate(q[bi, i, hi], i)
                keys = range(i + 1) if causal else range(s)
                scores = torch.stack([qi @ rotate(k[bi, j, gi], j) for j in keys]) / math.sqrt(dh)
                p = scores.softmax(0)
                out[bi, i, hi] = sum(p[n] * v[bi, j, gi] for n, j in enumerate(keys))
    return attn.o_proj(out.reshape(b, s, h * dh))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("qk_norm", ["none", "head"])
def test_attention_equals_a_naive_loop(causal, qk_norm):
    torch.manual_seed(0)
    node = AttentionNode(
        heads=4, kv_heads=2, head_dim=6, rope_theta=100.0, qk_norm=qk_norm, bias=False, causal=causal
    )
    attn = Attention(node, d_model=16, eps=1e-5)
    cos, sin = rope_tables(6, 5, 100.0)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(
        attn(x, cos, sin), _naive_attention(attn, x, 100.0, causal), atol=1e-5, rtol=1e-5
    )


def test_loss_is_cross_entropy_plus_aux_losses():
    net = moespec.build(TINY, seed=1).train()
    ids = _ids()
    out = net(ids, labels=ids)
    logp = out.logits.double().log_softmax(-1)
    nll = -torch.stack([logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(6)]).mean()
    torch.testing.assert_close(out.ce_loss.double(), nll)
    aux = sum(b.ffn.aux_loss for b in net.blocks if isinstance(b.ffn, MoELayer))
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(moespec.aux_losses(net), aux)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net(ids).loss is None


def test_decoder_is_causal_and_encoder_is_not():
    ids = _ids()
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 1) % 11
    dec = moespec.build(TINY).eval()
    a, b = dec(ids).logits, dec(later).logits
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    enc = moespec.build(_spec(kind="encoder", classes=3)).eval()
    assert enc(ids).logits.shape == (2, 3)
    assert not torch.allclose(enc(ids).logits, enc(later).logits)
    labels = torch.tensor([0, 2])
    out = enc.train()(ids, labels=labels)
    torch.testing.assert_close(out.ce_loss, torch.nn.functional.cross_entropy(out.logits, labels))


def _by_hand(net: MoENetwork, ids: torch.Tensor, carry: bool) -> torch.Tensor:
    """The network's logits with the blocks run one by one here: each MoE layer gets the
    input ids and (``carry``) the previous MoE layer's router logits."""
    x = net.embed_tokens(ids)
    s = ids.shape[1]
    cos, sin = net.rope_cos[:s], net.rope_sin[:s]
    prev = None
    for block in net.blocks:
        x = x + block.attn(block.attn_norm(x), cos, sin)
        h = block.ffn_norm(x)
        if isinstance(block.ffn, MoELayer):
            names = [e.name for e in block.ffn.ir.router.extra_inputs]
            kw = {"input_ids": ids} if "input_ids" in names else {}
            if "prev_router_logits" in names and carry:
                kw["prev_router_logits"] = prev
            x = x + block.ffn(h, **kw)
            prev = block.ffn.router_logits
        else:
            x = x + block.ffn(h)
    return net.head(net.norm(x))


MODEL = {
    "kind": "decoder_lm",
    "vocab_size": 11,
    "blocks": 3,
    "max_seq_len": 12,
    "attention": {"heads": 2},
    "norm": {"kind": "rmsnorm"},
}


@pytest.mark.parametrize(
    ("file", "overrides"),
    [
        ("moe-plus-plus.yaml", ["d_model=16", "layer.experts.routed.0.d_ff=8", "target.dtype=fp32"]),
        ("hash-layers.yaml", ["d_model=16", "layer.experts.routed.0.d_ff=8", "layer.router.vocab_size=11"]),
    ],
)
def test_routing_state_flows_block_to_block(file, overrides):
    data = load_spec(SPECS / file, overrides).spec.model_dump(mode="json", exclude={"extends"})
    data["model"] = MODEL
    data["target"]["dtype"] = "fp32"
    net = moespec.build(data, seed=2).eval()
    ids = _ids()
    torch.testing.assert_close(net(ids).logits, _by_hand(net, ids, carry=True))
    if file.startswith("moe-plus-plus"):  # the residual matters: without it the logits differ
        assert not torch.allclose(net(ids).logits, _by_hand(net, ids, carry=False))


def test_greedy_generate():
    net = moespec.build(TINY, seed=3)
    ids = _ids(1, 4)
    out = net.generate(ids, 5)
    assert out.shape == (1, 9) and torch.equal(out[:, :4], ids) and net.training
    want = ids
    for _ in range(5):
        want = torch.cat([want, net.eval()(want).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="max_seq_len=12"):
        net(_ids(1, 13))


def test_set_step_reaches_every_moe_block():
    data = copy.deepcopy(TINY)
    data["layer"]["router"]["k"] = 2
    data["layer"]["schedules"] = [{"param": "router.k", "kind": "linear", "start": 1, "end": 2, "steps": 10}]
    net = moespec.build(data)
    moespec.set_step(net, 10)
    assert [int(m.schedule.step) for m in net.moe_layers] == [10, 10]


def test_layer_option_builds_one_layer():
    assert isinstance(moespec.build(TINY, layer="layer"), MoELayer)
    assert isinstance(moespec.build(SPECS / "debug-tiny.yaml"), MoELayer)


def _mpp() -> dict:
    """MoE++ (gating residual across MoE blocks) in a tiny decoder."""
    small = ["d_model=16", "layer.experts.routed.0.d_ff=8", "target.dtype=fp32"]
    data = load_spec(SPECS / "moe-plus-plus.yaml", small).spec.model_dump(mode="json", exclude={"extends"})
    return {**data, "model": MODEL}


@pytest.mark.parametrize("which", ["tiny", "moe_plus_plus"])
def test_torch_compile_matches_eager(which):
    net = moespec.build(TINY if which == "tiny" else _mpp(), seed=4).train()
    ids = _ids()
    want = net(ids, labels=ids)
    # aot_eager keeps the test fast; the inductor backend compiles it too (about 20 s here).
    got = torch.compile(net, backend="aot_eager", fullgraph=True)(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize(
    ("file", "overrides"),
    [
        ("soft-moe.yaml", ["layer.router.group_size=7"]),
        ("expert-choice.yaml", []),
    ],
)
def test_encoder_takes_non_causal_routers(file, overrides):
    """Soft MoE and expert choice route with later tokens: refused in a decoder (golden
    model_decoder_not_causal), the shape they are made for in an encoder."""
    small = [
        "d_model=16",
        "layer.experts.routed.0.d_ff=8",
        "layer.experts.routed.0.count=4",
        "target.dtype=fp32",
    ]
    data = load_spec(SPECS / file, [*small, *overrides]).spec.model_dump(mode="json", exclude={"extends"})
    data["model"] = {**MODEL, "kind": "encoder", "classes": 3, "norm": {"kind": "layernorm"}}
    net = moespec.build(data, seed=5)
    ids, labels = _ids(3, 7), torch.tensor([0, 1, 2])
    out = net(ids, labels=labels)
    assert out.logits.shape == (3, 3)
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    torch.testing.assert_close(net(ids).logits, _by_hand(net, ids, carry=True))
