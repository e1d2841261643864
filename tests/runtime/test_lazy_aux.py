"""In eval mode a layer computes its auxiliary loss and routing statistics only when they are
read (inference pays nothing for them), with the same values as an eager computation; in
training they are computed by every call."""

from __future__ import annotations

from pathlib import Path

import torch

import moespec

SPEC = str(Path(__file__).resolve().parents[2] / "specs" / "mixtral-8x7b.yaml")
SMALL = ("d_model=32", "layer.experts.routed.0.d_ff=48", "target.dtype=fp32")


def _counting(layer):
    calls = []
    real = layer.aux.forward
    layer.aux.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    return calls


def test_eval_aux_is_computed_when_read():
    layer = moespec.build(SPEC, SMALL, seed=1).eval()
    calls = _counting(layer)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert calls == []  # two inference calls, no aux work
    stats, loss = layer.routing_stats, layer.aux_loss
    assert len(calls) == 1 and set(stats) >= {"routed_per_expert", "tokens_per_expert", "router_entropy"}
    assert int(stats["routed_per_expert"].sum()) == 2 * 5 * 2
    # The same numbers as the eager (training-mode) computation on the same routing: train
    # mode draws no noise for this router, so the routing is the same.
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.aux_loss, loss)
    for k, v in layer.routing_stats.items():
        torch.testing.assert_close(v, stats[k], msg=k)


def test_training_computes_aux_every_call():
    layer = moespec.build(SPEC, SMALL, seed=1).train()
    calls = _counting(layer)
    layer(torch.randn(3, 32))
    assert len(calls) == 1 and layer.aux_loss.requires_grad
