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
    layer = moespec.build(SPEC, SMALL, seed=1, layer="layer").eval()
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
    layer = moespec.build(SPEC, SMALL, seed=1, layer="layer").train()
    calls = _counting(layer)
    layer(torch.randn(3, 32))
    assert len(calls) == 1 and layer.aux_loss.requires_grad


def test_a_late_read_keeps_the_call_s_grad_mode_and_eval_mode():
    layer = moespec.build(SPEC, SMALL, seed=1, layer="layer").eval()
    x = torch.randn(6, 32)
    y = layer(x)  # eval with grad (RL rollouts, eval-mode fine-tuning)
    with torch.no_grad():
        layer.train()  # neither the reader's no_grad nor a later mode change applies
        loss = layer.aux_loss
    assert loss.requires_grad
    (y.sum() + loss).backward()
    assert layer.router.weight.grad is not None


def test_a_copy_is_not_tapped_and_holds_no_pending_call():
    import copy

    layer = moespec.build(SPEC, SMALL, seed=1, layer="layer").eval()
    with moespec.record_routing(layer):
        layer(torch.randn(4, 32))
        twin = copy.deepcopy(layer)
    assert "_routing_tap" not in twin.__dict__ and twin.__dict__.get("_pending_aux") is None
    with moespec.record_routing(twin) as rec:
        twin(torch.randn(4, 32))
    assert len(rec.experts[""]) == 1
