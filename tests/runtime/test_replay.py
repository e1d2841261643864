"""Routing replay: recording a model's routing and replaying it (moespec.record_routing /
replay_routing). Oracles: the layer's own routing (same inputs), the recording itself
(another model routes as recorded), and a hand-written top-k layer whose router is masked
to the recorded experts (gradients), for softmax-then-top-k with renormalisation and
top-k-then-softmax; capacity applies to the replayed choice; unsupported routers and
mismatched recordings fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"
MIXTRAL = str(SPECS / "mixtral-8x7b.yaml")
SMALL = ("d_model=32", "layer.experts.routed.0.d_ff=48", "target.dtype=fp32")


def _model(seed: int, *extra: str) -> torch.nn.Module:
    return torch.nn.Sequential(
        moespec.build(MIXTRAL, (*SMALL, *extra), seed=seed, layer="layer"),
        moespec.build(MIXTRAL, (*SMALL, *extra), seed=seed + 1, layer="layer"),
    )


def test_replaying_the_same_inputs_reproduces_the_forward():
    model = _model(0).train()
    x = torch.randn(2, 6, 32)
    with moespec.record_routing(model) as rec:
        y = model(x)
    assert set(rec.experts) == {"0", "1"} and rec.experts["0"][0].shape == (12, 2)
    aux = [m.aux_loss for m in model]
    with moespec.replay_routing(model, rec):
        y2 = model(x)
    assert torch.equal(y, y2)
    for m, a in zip(model, aux, strict=True):
        torch.testing.assert_close(m.aux_loss, a)


def test_another_model_routes_as_recorded():
    source, target = _model(0).eval(), _model(10).eval()
    x = torch.randn(9, 32)
    with torch.no_grad(), moespec.record_routing(source) as rec:
        source(x)
        source(x * 2)  # two calls: replayed in order
    with (
        pytest.raises(RuntimeError, match="already recording or replaying"),
        moespec.replay_routing(target, rec),
        moespec.record_routing(target),
    ):
        pass
    with torch.no_grad(), moespec.replay_routing(target, rec):
        target(x)
        target(x * 2)
        with pytest.raises(RuntimeError, match="called 3 times, but the recording holds 2"):
            target(x)
    # What the target's layers used: tokens_per_expert follows the recorded choice.
    with torch.no_grad(), moespec.replay_routing(target, rec):
        target(x)
        counts = target[0].routing_stats["routed_per_expert"]
    assert torch.equal(counts, torch.bincount(rec.experts["0"][0].flatten(), minlength=8))


def _masked_reference(layer, x_TD, idx_TK, order):
    """A top-k layer written out, its router masked to the recorded experts: -inf outside
    them, so the softmax over the kept logits (renormalised top-k or top-k-then-softmax,
    which agree on a masked row) gives the weights; experts applied token by token."""
    logits_TE = F.linear(x_TD, layer.router.weight)
    mask_TE = torch.full_like(logits_TE, float("-inf")).scatter(1, idx_TK, 0.0)
    w_TE = (logits_TE + mask_TE).softmax(-1)
    ex = layer.experts.get_submodule("0")
    out = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros_like(x_TD[t])
        for e in idx_TK[t].tolist():
            h = F.silu(x_TD[t] @ ex.w_gate[e].T) * (x_TD[t] @ ex.w_up[e].T)
            acc = acc + w_TE[t, e] * (h @ ex.w_down[e].T)
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("order", ["softmax_then_topk", "topk_then_softmax"])
def test_gradients_match_a_router_masked_to_the_recording(order):
    over = (f"layer.router.order={order}", "~layer.losses") + (
        ("layer.router.renormalize=true",) if order == "softmax_then_topk" else ()
    )
    layer = moespec.build(MIXTRAL, (*SMALL, *over), seed=3, layer="layer").train()
    other = moespec.build(MIXTRAL, (*SMALL, *over), seed=4, layer="layer")
    x = torch.randn(7, 32)
    with torch.no_grad(), moespec.record_routing(other) as rec:
        other(x)
    idx = rec.experts[""][0]
    with moespec.replay_routing(layer, rec):
        y = layer(x)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref = _masked_reference(layer, x, idx, order)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    (ref * probe).sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert got["router.weight"].abs().sum() > 0  # the router still learns


def test_recorded_weights_and_capacity():
    over = ("layer.capacity={kind: factor, train_factor: 1.0, eval_factor: 1.0}",)
    layer = moespec.build(MIXTRAL, (*SMALL, *over), seed=3, layer="layer").train()
    x = torch.randn(16, 32)
    with torch.no_grad(), moespec.record_routing(layer, weights=True) as rec:
        layer(x)
    rec.experts[""][0][:] = torch.tensor([0, 1])  # every token on experts 0 and 1: over capacity
    with moespec.replay_routing(layer, rec, weights="recorded"):
        layer(x)
    kept = layer.routing_stats["tokens_per_expert"]
    assert kept[2:].sum() == 0 and (kept[:2] <= 4).all()  # capacity 16 * 2 / 8 = 4 per expert
    with (
        pytest.raises(ValueError, match="weights=True"),
        moespec.replay_routing(layer, moespec.RoutingRecording(rec.experts), weights="recorded"),
    ):
        pass


def test_bad_requests_fail_clearly():
    soft = moespec.build(
        str(SPECS / "soft-moe.yaml"),
        (
            "d_model=16",
            "layer.experts.routed.0.d_ff=8",
            "layer.experts.routed.0.count=4",
            "target.dtype=fp32",
        ),
    )
    with (
        pytest.raises(ValueError, match=r"soft_moe router\) has no per-token choice to replay"),
        moespec.record_routing(soft),
    ):
        pass
    layer = moespec.build(MIXTRAL, SMALL, layer="layer")
    with moespec.record_routing(layer) as rec:
        layer(torch.randn(3, 32))
    with pytest.raises(ValueError, match="do not match"), moespec.replay_routing(_model(0), rec):
        pass
    with (
        pytest.raises(ValueError, match="routes 5 rows, the recording 3"),
        moespec.replay_routing(layer, rec),
    ):
        layer(torch.randn(5, 32))
    with (
        pytest.raises(ValueError, match="'router' or 'recorded'"),
        moespec.replay_routing(layer, rec, weights="mine"),
    ):
        pass


def test_replay_under_torch_compile():
    source = moespec.build(MIXTRAL, SMALL, seed=1, layer="layer").train()
    layer = moespec.build(MIXTRAL, SMALL, seed=5, layer="layer").train()
    x = torch.randn(7, 32)
    with moespec.record_routing(source) as rec:
        source(x)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with moespec.replay_routing(layer, rec):
        got = compiled(x)
    with moespec.replay_routing(layer, rec):
        want = layer(x)
    assert torch.equal(got, want)
    assert torch.equal(compiled(x), layer(x))  # outside the block: its own routing again


def test_cosine_router_replays_and_others_are_refused():
    xmoe = str(SPECS / "x-moe.yaml")
    small = (
        "d_model=32",
        "layer.experts.routed.0.d_ff=16",
        "layer.experts.routed.0.count=6",
        "target.dtype=fp32",
    )
    a, b = moespec.build(xmoe, small, seed=1), moespec.build(xmoe, small, seed=2)
    x = torch.randn(5, 32)
    with moespec.record_routing(a) as rec:
        a(x)
    with moespec.replay_routing(b, rec):
        b(x)
    assert torch.equal(
        b.routing_stats["routed_per_expert"], torch.bincount(rec.experts[""][0].flatten(), minlength=6)
    )
    hashed = moespec.build(str(SPECS / "hash-layers.yaml"), ("d_model=16", "target.dtype=fp32"))
    with (
        pytest.raises(ValueError, match=r"hash router\) does not support routing replay yet"),
        moespec.record_routing(hashed),
    ):
        pass


def test_multi_head_layers_replay_their_sub_tokens():
    mh = str(SPECS / "mh-moe.yaml")
    small = ("d_model=32", "layer.experts.routed.0.d_ff=16", "target.dtype=fp32")
    a, b = moespec.build(mh, small, seed=1), moespec.build(mh, small, seed=2)
    x = torch.randn(6, 32)
    with moespec.record_routing(a) as rec:
        a(x)
    heads = a.ir.heads
    assert heads > 1 and rec.experts[""][0].shape[0] == 6 * heads
    with moespec.replay_routing(b, rec):
        b(x)
    n_exp = b.ir.experts.n_experts
    want = torch.bincount(rec.experts[""][0].flatten(), minlength=n_exp)
    assert torch.equal(b.routing_stats["routed_per_expert"], want)


def test_checkpointed_recompute_is_not_recorded_and_replay_refuses_it():
    from torch.utils.checkpoint import checkpoint

    layer = moespec.build(MIXTRAL, SMALL, seed=1, layer="layer").train()
    x = torch.randn(5, 32, requires_grad=True)
    with moespec.record_routing(layer) as rec:
        checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert len(rec.experts[""]) == 1
    with moespec.replay_routing(layer, rec), pytest.raises(RuntimeError, match="activation checkpointing"):
        checkpoint(layer, x, use_reentrant=False).sum().backward()


def test_recorded_weights_refused_with_a_scheduled_k():
    over = ("+layer.schedules=[{param: router.k, kind: linear, start: 2, end: 1, steps: 10}]",)
    layer = moespec.build(MIXTRAL, (*SMALL, *over), seed=1, layer="layer")
    with moespec.record_routing(layer, weights=True) as rec:
        layer(torch.randn(3, 32))
    with (
        pytest.raises(ValueError, match=r"schedules router\.k"),
        moespec.replay_routing(layer, rec, weights="recorded"),
    ):
        pass


def test_sinkhorn_router_replays_with_gradients_through_its_scores():
    spec = str(SPECS / "sinkhorn.yaml")
    small = (
        "d_model=32",
        "layer.experts.routed.0.d_ff=16",
        "layer.experts.routed.0.count=6",
        "target.dtype=fp32",
    )
    a, b = moespec.build(spec, small, seed=1).train(), moespec.build(spec, small, seed=2).train()
    x = torch.randn(8, 32)
    with moespec.record_routing(a) as rec:
        a(x)
    with moespec.replay_routing(b, rec):
        y = b(x)
    assert torch.equal(
        b.routing_stats["routed_per_expert"], torch.bincount(rec.experts[""][0].flatten(), minlength=6)
    )
    y.square().sum().backward()
    assert b.router.weight.grad.abs().sum() > 0
