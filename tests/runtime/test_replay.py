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
    ec = moespec.build(str(SPECS / "expert-choice.yaml"), ("d_model=16", "target.dtype=fp32"))
    with (
        pytest.raises(ValueError, match=r"expert_choice router\) chooses tokens per expert"),
        moespec.record_routing(ec),
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


HASH = ("d_model=16", "layer.experts.routed.0.d_ff=8", "layer.router.vocab_size=50", "target.dtype=fp32")


def test_hash_router_replays_another_tables_routing():
    """Oracle: the target layer with the source's hash table loaded routes as the replay."""
    spec = str(SPECS / "hash-layers.yaml")
    a = moespec.build(spec, (*HASH, "layer.router.seed=1"), seed=1)
    b = moespec.build(spec, (*HASH, "layer.router.seed=2"), seed=2)
    assert not torch.equal(a.router.table, b.router.table)
    x, ids = torch.randn(2, 7, 16), torch.randint(0, 50, (2, 7))
    with moespec.record_routing(a) as rec:
        a(x, input_ids=ids)
    assert torch.equal(rec.experts[""][0], a.router.table[ids.flatten()])
    with moespec.replay_routing(b, rec):
        got = b(x, input_ids=ids)
    stats = b.routing_stats["routed_per_expert"]
    b.router.table.copy_(a.router.table)
    want = b(x, input_ids=ids)
    assert torch.equal(got, want)
    assert torch.equal(stats, b.routing_stats["routed_per_expert"])


BASE = ("d_model=16", "layer.experts.routed.0.d_ff=8", "layer.experts.routed.0.count=4", "target.dtype=fp32")


def _base_reference(layer, x_TD, idx_T, alpha_T=None):
    """BASE written out: y = a·f_e(x) + (1 - a)·x with a = sigmoid(x·c_e) (or the given gates),
    f_e a ReLU MLP with biases, e the given expert of each token."""
    ex = layer.experts.get_submodule("0")
    if alpha_T is None:
        alpha_T = torch.sigmoid((x_TD * layer.router.centroids[idx_T]).sum(-1, keepdim=True))
    h = torch.relu(torch.einsum("td,tfd->tf", x_TD, ex.w_up[idx_T]) + ex.b_up[idx_T])
    f = torch.einsum("tf,tdf->td", h, ex.w_down[idx_T]) + ex.b_down[idx_T]
    return alpha_T * f + (1 - alpha_T) * x_TD


def test_base_layer_replays_without_solving(monkeypatch):
    spec = str(SPECS / "base-layers.yaml")
    a, b = moespec.build(spec, BASE, seed=1).train(), moespec.build(spec, BASE, seed=2).train()
    x = torch.randn(12, 16)
    with moespec.record_routing(a, weights=True) as rec:
        y = a(x)
    assert torch.equal(torch.bincount(rec.experts[""][0].flatten(), minlength=4), torch.full((4,), 3))

    class NoSolver:
        def __getattr__(self, name):
            raise AssertionError(f"the solver ran ({name}) while replaying")

    from moespec.lower.routers import base_layer

    monkeypatch.setattr(base_layer, "OPS", NoSolver())
    with moespec.replay_routing(a, rec):
        assert torch.equal(a(x), y)  # the same inputs: the same forward, no solver
    xb = x.clone().requires_grad_()
    with moespec.replay_routing(b, rec):
        got = b(xb)
    want = _base_reference(b, x, rec.experts[""][0][:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.square().sum().backward()
    assert b.router.centroids.grad.abs().sum() > 0  # the gate of the replayed experts trains
    with moespec.replay_routing(b, rec, weights="recorded"):
        b.zero_grad()
        out = b(x)
    want = _base_reference(b, x, rec.experts[""][0][:, 0], alpha_T=rec.weights[""][0])  # a's gates
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert b.router.centroids.grad is None or b.router.centroids.grad.abs().sum() == 0


VARIABLE = ("d_model=16", "layer.experts.routed.0.d_ff=8", "layer.experts.routed.0.count=6")
VARIABLE = (*VARIABLE, "target.dtype=fp32")


def _kept(logits_TE, rec_TK, gates_TE):
    """[T, K] gates of the recorded slots (0 where the recording marks a slot unused)."""
    return torch.where(rec_TK >= 0, gates_TE.gather(1, rec_TK.clamp(min=0)), 0.0)


def _adaptive_kept(logits_TE, rec_TK):
    """adaptive gating's `kept` weights: the softmax probabilities of the recorded experts,
    normalised over the slots in use."""
    g_TK = _kept(logits_TE, rec_TK, logits_TE.softmax(-1))
    return g_TK / g_TK.sum(-1, keepdim=True)


# spec, the hand-written gates of the recorded experts from the router's logits (None: checked
# through the routing only)
VARIABLE_ROUTERS = {
    "top-p-dynamic": lambda lg, rec: _kept(lg, rec, lg.softmax(-1)),  # probabilities, no renormalising
    "remoe": lambda lg, rec: _kept(lg, rec, torch.relu(lg)),
    "adaptive-gating": _adaptive_kept,
    "dselect-k": None,
}


@pytest.mark.parametrize("name", sorted(VARIABLE_ROUTERS))
def test_routers_with_a_variable_number_of_experts_replay(name):
    """The recording marks unused slots -1; replaying it on the same model reproduces the
    forward, on another model routes as recorded (counts), and the output equals the
    recorded experts, run by the plain reference, weighted by the router's current gates
    written out by hand."""
    from moespec.reference.experts import expert_forward
    from moespec.spec.load import load_spec

    spec = str(SPECS / f"{name}.yaml")
    over = (*VARIABLE, *(("layer.router.threshold=0.003",) if name == "adaptive-gating" else ()))
    a, b = moespec.build(spec, over, seed=1).train(), moespec.build(spec, over, seed=2).train()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    with moespec.record_routing(a) as rec:
        y = a(x)
    rec_TK = rec.experts[""][0]
    # some token leaves a slot unused (DSelect-k's smooth gates select every expert at init)
    assert rec_TK.min() == (0 if name == "dselect-k" else -1)
    with moespec.replay_routing(a, rec):
        assert torch.equal(a(x), y)
    with moespec.replay_routing(b, rec):
        got = b(x)
    want_E = torch.bincount(rec_TK[rec_TK >= 0], minlength=6)
    assert torch.equal(b.routing_stats["routed_per_expert"], want_E)
    gates = VARIABLE_ROUTERS[name]
    if gates is None:
        return
    experts = load_spec(spec, over).spec.layer.experts
    params = dict(b.named_parameters())
    g_TK = gates(x @ b.router.weight.T, rec_TK)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(rec_TK[t].tolist()):
            if e >= 0:
                want[t] += g_TK[t, j] * expert_forward(e, x[t : t + 1], params, experts)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VARIABLE_ROUTERS))
def test_variable_routers_replay_recorded_weights(name):
    """weights='recorded' on the same model reproduces its forward; ReMoE's L1 term still
    reads the router's own gates (so it keeps its gradient)."""
    spec = str(SPECS / f"{name}.yaml")
    over = (*VARIABLE, *(("layer.router.threshold=0.003",) if name == "adaptive-gating" else ()))
    layer = moespec.build(spec, over, seed=1).train()
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    with moespec.record_routing(layer, weights=True) as rec:
        y = layer(x)
    with moespec.replay_routing(layer, rec, weights="recorded"):
        assert torch.equal(layer(x), y)
        if name == "remoe":
            assert layer.aux_loss.requires_grad


def test_malformed_variable_recordings_fail_clearly():
    from moespec.runtime.replay import RoutingRecording

    top_p = moespec.build(str(SPECS / "top-p-dynamic.yaml"), VARIABLE, seed=1)
    bad = RoutingRecording()
    bad.experts[""] = [torch.tensor([[5, 4, 3, 2, 1, 0]] * 4)]  # slot e must hold e or -1
    with (
        pytest.raises(ValueError, match=r"\(call 0\) is not a selection over every expert"),
        moespec.replay_routing(top_p, bad),
    ):
        pass
    over = (*VARIABLE, "layer.router.threshold=0.003")
    adaptive = moespec.build(str(SPECS / "adaptive-gating.yaml"), over, seed=1)
    bad.experts[""] = [torch.tensor([[1, 2], [-1, 3]])]
    with pytest.raises(ValueError, match="first slot unused"), moespec.replay_routing(adaptive, bad):
        pass
