"""Built modules (``moespec.build`` from a spec) against transformers' own sparse MoE blocks.

The spec comes either from an example spec in specs/ shrunk with CLI-style overrides, or
from a plain dict; the HF block is a tiny random Mixtral / Qwen3-MoE block built in memory
(fp32, nothing downloaded). The HF weights are copied into the moespec module by hand with
``load_state_dict(strict=True)``:

    HF gate.weight [E, D]                      -> router.weight [E, D]
    HF experts.gate_up_proj [E, 2F, D]         -> experts.0.w_gate = [:, :F], experts.0.w_up = [:, F:]
    HF experts.down_proj [E, D, F]             -> experts.0.w_down [E, D, F]

and the same loss (output and router logits against fixed random probes) is backpropagated
through both: output, router logits, per-expert token counts, the input gradient and the
gradient of every weight (mapped back to HF's layout) must agree (atol 1e-5).

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, F expert width, E experts, K top-k.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

import moespec  # noqa: E402

SPECS = Path(__file__).resolve().parents[2] / "specs"
ATOL, RTOL = 1e-5, 1e-4
# (batch, seq): T = 1, 7 and 64 tokens.
SHAPES = [(1, 1), (1, 7), (4, 16)]


def randomize(module: nn.Module, seed: int) -> None:
    """HF leaves expert weights uninitialised (torch.empty) outside from_pretrained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def eager(config: Any) -> Any:
    config._experts_implementation = "eager"  # the plain per-expert loop
    return config


def hf_to_moespec(block: nn.Module, f: int) -> dict[str, Tensor]:
    """The moespec state_dict holding the HF block's weights."""
    gate_up = block.experts.gate_up_proj.detach()
    return {
        "router.weight": block.gate.weight.detach().clone(),
        "experts.0.w_up": gate_up[:, f:].clone(),
        "experts.0.w_gate": gate_up[:, :f].clone(),
        "experts.0.w_down": block.experts.down_proj.detach().clone(),
    }


def compare(block: nn.Module, layer: nn.Module, f: int, shape: tuple[int, int], training: bool) -> None:
    """Same weights -> same y, router logits, counts, dL/dx and dL/dW for every weight."""
    b, s = shape
    d, e = block.gate.weight.shape[1], block.gate.weight.shape[0]
    loaded = layer.load_state_dict(hf_to_moespec(block, f), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    block.train(training)
    layer.train(training)

    gen = torch.Generator().manual_seed(b * 100 + s)
    x = torch.randn(b, s, d, generator=gen)
    probe_y = torch.randn(b, s, d, generator=gen)
    probe_logits = torch.randn(b * s, e, generator=gen)

    captured: dict[str, Tensor] = {}

    def keep_router_out(_mod: nn.Module, _inp: Any, out: tuple[Tensor, Tensor, Tensor]) -> None:
        captured["logits"], captured["weights"], captured["idx"] = out

    handle = block.gate.register_forward_hook(keep_router_out)
    try:
        x_hf = x.clone().requires_grad_()
        y_hf = block(x_hf)
    finally:
        handle.remove()
    x_ms = x.clone().requires_grad_()
    y_ms = layer(x_ms)

    assert y_ms.shape == x.shape
    torch.testing.assert_close(y_ms, y_hf, atol=ATOL, rtol=RTOL)
    assert layer.router_logits.shape == (b * s, e)
    torch.testing.assert_close(layer.router_logits, captured["logits"], atol=ATOL, rtol=RTOL)
    hf_counts = torch.bincount(captured["idx"].reshape(-1), minlength=e)
    assert layer.routing_stats["tokens_per_expert"].tolist() == hf_counts.tolist()
    assert layer.routing_stats["routed_per_expert"].tolist() == hf_counts.tolist()

    ((y_hf * probe_y).sum() + (captured["logits"] * probe_logits).sum()).backward()
    ((y_ms * probe_y).sum() + (layer.router_logits * probe_logits).sum()).backward()

    torch.testing.assert_close(x_ms.grad, x_hf.grad, atol=ATOL, rtol=RTOL)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert set(grads) == {"router.weight", "experts.0.w_up", "experts.0.w_gate", "experts.0.w_down"}
    # HF's gradient is dense over all experts (zero for experts no token picked), as ours is.
    assert all(g is not None for g in grads.values()), "a weight got no gradient"
    want_gate_up = torch.cat([grads["experts.0.w_gate"], grads["experts.0.w_up"]], dim=1)
    torch.testing.assert_close(want_gate_up, block.experts.gate_up_proj.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grads["experts.0.w_down"], block.experts.down_proj.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(grads["router.weight"], block.gate.weight.grad, atol=ATOL, rtol=RTOL)


# --- Mixtral -------------------------------------------------------------------------------


def mixtral_block(d: int, f: int, e: int, k: int, seed: int) -> nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=e,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(eager(cfg)).float()
    randomize(block, seed)
    return block


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xS{s[1]}")
def test_mixtral_from_example_spec(shape: tuple[int, int], training: bool) -> None:
    """specs/mixtral-8x7b.yaml shrunk by overrides (8 experts, top-2, renormalised)."""
    d, f = 48, 32
    layer = moespec.build(
        SPECS / "mixtral-8x7b.yaml",
        (f"d_model={d}", f"layer.experts.routed.0.d_ff={f}", "target.dtype=fp32"),
        layer="layer",
    )
    compare(mixtral_block(d, f, 8, 2, seed=0), layer, f, shape, training)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xS{s[1]}")
def test_mixtral_topk_then_softmax_dict_spec(shape: tuple[int, int]) -> None:
    """Mixtral's gate written the other way (softmax over the k kept logits), from a dict,
    with an odd d_model and k=3 of 6 experts."""
    d, f, e, k = 37, 20, 6, 3
    spec = {
        "moespec": 1,
        "name": "hf-mixtral",
        "d_model": d,
        "layer": {
            "experts": {"routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}]},
            "router": {"kind": "topk", "k": k, "order": "topk_then_softmax"},
        },
    }
    compare(mixtral_block(d, f, e, k, seed=1), moespec.build(spec), f, shape, training=True)


# --- Qwen3-MoE -------------------------------------------------------------------------------


def qwen3_block(d: int, f: int, e: int, k: int, norm: bool, seed: int) -> nn.Module:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=d, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=k, norm_topk_prob=norm
    )
    block = Qwen3MoeSparseMoeBlock(eager(cfg)).float()
    randomize(block, seed)
    return block


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("norm", [True, False], ids=["norm_topk", "raw_topk"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xS{s[1]}")
def test_qwen3_moe_from_example_spec(shape: tuple[int, int], norm: bool, training: bool) -> None:
    """specs/qwen3-30b-a3b.yaml shrunk by overrides; norm_topk_prob <-> router.renormalize."""
    d, f, e, k = 40, 24, 16, 4
    overrides = (
        f"d_model={d}",
        f"layer.experts.routed.0.count={e}",
        f"layer.experts.routed.0.d_ff={f}",
        f"layer.router.k={k}",
        f"layer.router.renormalize={'true' if norm else 'false'}",
        "target.dtype=fp32",
    )
    layer = moespec.build(SPECS / "qwen3-30b-a3b.yaml", overrides, layer="layer")
    compare(qwen3_block(d, f, e, k, norm, seed=2), layer, f, shape, training)


@pytest.mark.parametrize("norm", [True, False], ids=["norm_topk", "raw_topk"])
def test_qwen3_moe_dict_spec_odd_width(norm: bool) -> None:
    """The same block from a dict spec: odd d_model, F not a multiple of 8, k=3 of 6."""
    d, f, e, k = 33, 18, 6, 3
    spec = {
        "moespec": 1,
        "name": "hf-qwen3-moe",
        "d_model": d,
        "layer": {
            "experts": {"routed": [{"kind": "glu", "activation": "silu", "d_ff": f, "count": e}]},
            "router": {"kind": "topk", "k": k, "score": "softmax", "renormalize": norm},
            "capacity": {"kind": "dropless"},
        },
    }
    compare(qwen3_block(d, f, e, k, norm, seed=3), moespec.build(spec), f, (2, 7), training=False)
