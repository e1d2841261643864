"""What built modules do with the inputs training code hands them.

- wrong inputs fail early with a clear message: a last dim other than d_model is a
  ValueError naming the expected shape, a dtype other than target.dtype (integers, or a
  float the layer was not built for) a TypeError naming the expected dtype;
- NaN / inf tokens do not crash: their own output rows are non-finite, the other tokens'
  rows are what they would be without them (dropless routing keeps tokens independent);
- shapes: [B, S, D] (B sequences, for `scope: sequence` losses), [T, D], any [..., D]
  flattened to tokens, and a 1-D [D] input is ONE token (output [D], same values as [1, D]);
- empty inputs (T = 0) run forward and backward: output of the same empty shape, aux loss 0;
- randomness: a seeded ``generator=`` makes train-mode jitter, noise, GShard policies and
  random drops reproducible, and leaves the global RNG alone;
- the aux-loss-free expert bias moves after a training forward toward balance (overloaded
  experts down, underloaded up) and not in eval;
- ``moespec.aux_losses(model)`` sums every moespec layer's aux loss.

Shape legend: B batch, S sequence, T tokens, D d_model, E experts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import moespec
from moespec.runtime.layer import MoELayer

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = SPECS / "debug-tiny.yaml"
D = 32  # d_model of every debug spec


def x_of(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- wrong inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 31), (2, 3, 33), (D, 4), (), (0,)], ids=str)
def test_wrong_last_dim_is_a_value_error_naming_the_shape(shape: tuple[int, ...]) -> None:
    m = moespec.build(TINY)
    with pytest.raises(ValueError, match=re.escape(f"shape [..., {D}], got {shape}")):
        m(torch.zeros(shape))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_wrong_dtype_is_a_type_error_naming_the_dtype(dtype: torch.dtype) -> None:
    m = moespec.build(TINY)  # target.dtype fp32
    with pytest.raises(TypeError, match=rf"built for dtype torch\.float32.*got {dtype}"):
        m(torch.zeros(3, D, dtype=dtype))


def test_layer_built_for_fp64_takes_fp64_and_rejects_fp32() -> None:
    m = moespec.build(TINY, ("+target.dtype=fp64",))
    assert m.router.weight.dtype == torch.float64
    y = m(x_of(5, D, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert m.router_logits.dtype == torch.float32  # target.router_dtype (default fp32)
    with pytest.raises(TypeError, match=r"built for dtype torch\.float64.*got torch\.float32"):
        m(x_of(5, D))


def test_layer_cast_with_to_works_or_fails_clearly() -> None:
    """The README: a dtype other than target.dtype is a TypeError naming the expected one.
    A layer cast after build (model.to(dtype)) must either run in its parameters' dtype or
    refuse clearly (a regression guard: the check once used the build-time dtype)."""
    m = moespec.build(TINY).eval()
    m.to(torch.float64)
    for x in (x_of(5, D, dtype=torch.float64), x_of(5, D)):  # parameters' dtype, target.dtype
        try:
            y = m(x)
        except TypeError:
            continue  # a clear refusal is acceptable
        assert y.dtype == m.router.weight.dtype


def test_shape_is_checked_before_dtype() -> None:
    m = moespec.build(TINY)
    with pytest.raises(ValueError):
        m(torch.zeros(3, D + 1, dtype=torch.int64))


# --- non-finite inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["debug-tiny.yaml", "debug-hetero.yaml"])
@pytest.mark.parametrize("training", [False, True])
def test_nan_and_inf_tokens_stay_in_their_rows(spec: str, training: bool) -> None:
    """Dropless routing: each token's output depends on that token only, so a bad token
    poisons its own row (and the batch-level aux loss), not its neighbours' rows."""
    m = moespec.build(SPECS / spec).train(training)
    x = x_of(9, D)
    bad = x.clone()
    bad[2, 5] = float("nan")
    bad[6, 0] = float("inf")
    bad[7] = float("-inf")
    y = m(bad)
    assert y.shape == x.shape
    assert not bool(y[[2, 6, 7]].isfinite().all(-1).any()), "a non-finite token gave a finite row"
    good = [0, 1, 3, 4, 5, 8]
    assert bool(y[good].isfinite().all())
    torch.testing.assert_close(y[good], m(x[good]))  # as if the bad tokens were not there
    assert m.routing_stats["routed_per_expert"].sum() == len(good) * 2


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("layer.capacity.drop_policy=position",),
        ("layer.capacity.drop_policy=batch_priority",),
        ("layer.capacity.drop_policy=random",),
    ],
    ids=["score", "position", "batch_priority", "random"],
)
def test_nan_tokens_with_capacity_do_not_crash(overrides: tuple[str, ...]) -> None:
    """With a capacity limit tokens compete for slots (NaN weights sort first under
    `score` and `batch_priority`), so a NaN token may change which other tokens are dropped;
    it must not crash, its own row is non-finite and the rows of other tokens stay finite."""
    m = moespec.build(SPECS / "debug-capacity.yaml", overrides, generator=torch.Generator().manual_seed(0))
    for training in (True, False):
        m.train(training)
        x = x_of(16, D).requires_grad_()
        bad = x.detach().clone()
        bad[3] = float("nan")
        y = m(bad)
        assert not bool(y[3].isfinite().any())
        assert bool(y[torch.arange(16) != 3].isfinite().all())
        assert 0.0 <= float(m.routing_stats["dropped_fraction"]) <= 1.0


# --- input shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_token_layouts_agree(training: bool) -> None:
    """[B, S, D], [T, D], [A, B, S, D] and a non-contiguous view are the same tokens
    (batch-scoped losses: the same aux loss too)."""
    m = moespec.build(TINY, generator=torch.Generator().manual_seed(0)).train(training)
    x = x_of(2, 3, 5, D)
    outs = {}
    for name, inp in {
        "4d": x,
        "3d": x.reshape(6, 5, D),
        "2d": x.reshape(30, D),
        "2d-noncontiguous": x.reshape(30, D).t().contiguous().t(),
    }.items():
        y = m(inp)
        assert y.shape == inp.shape
        outs[name] = (y.reshape(30, D), m.aux_loss.detach(), m.routing_stats["routed_per_expert"])
    ref_y, ref_aux, ref_counts = outs["2d"]
    for name, (y, aux, counts) in outs.items():
        torch.testing.assert_close(y, ref_y, msg=name)
        torch.testing.assert_close(aux, ref_aux, msg=name)
        assert counts.tolist() == ref_counts.tolist(), name


def test_one_dim_input_is_a_single_token() -> None:
    """Decision (documented by this test): a 1-D input of length d_model is one token; the
    output is 1-D too and equals the [1, D] result."""
    m = moespec.build(SPECS / "debug-hetero.yaml").eval()
    x = x_of(D).requires_grad_()
    y = m(x)
    assert y.shape == (D,)
    assert m.router_logits.shape == (1, 8)
    assert int(m.routing_stats["routed_per_expert"].sum()) == 2  # k = 2 choices of one token
    torch.testing.assert_close(y, m(x.detach()[None])[0])
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (D,)


def test_sequence_scope_uses_the_batch_dimension() -> None:
    """`scope: sequence`: a [B, S, D] input averages the balance loss over the B sequences;
    a [T, D] input is a single sequence. The outputs are the same either way."""
    over = ("layer.losses.load_balance={kind: switch, weight: 1.0, scope: sequence}",)
    m = moespec.build(TINY, over).eval()
    x = x_of(3, 8, D)
    y3 = m(x)
    aux3 = m.aux_loss.detach()
    per_seq = []
    for b in range(3):
        m(x[b])
        per_seq.append(m.aux_loss.detach())
    torch.testing.assert_close(aux3, torch.stack(per_seq).mean())
    y2 = m(x.reshape(24, D))
    torch.testing.assert_close(y3.reshape(24, D), y2)
    assert not torch.allclose(m.aux_loss.detach(), aux3)  # one 24-token sequence differs


# --- empty inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, D), (2, 0, D), (0, 4, D)], ids=str)
@pytest.mark.parametrize("spec", ["debug-tiny.yaml", "debug-hetero.yaml", "debug-capacity.yaml"])
@pytest.mark.parametrize("training", [False, True])
def test_empty_input(shape: tuple[int, ...], spec: str, training: bool) -> None:
    m = moespec.build(SPECS / spec, generator=torch.Generator().manual_seed(0)).train(training)
    bias_before = {n: b.clone() for n, b in m.named_buffers()}
    x = torch.zeros(shape, requires_grad=True)
    y = m(x)
    assert y.shape == shape
    assert float(m.aux_loss.detach()) == 0.0
    assert m.router_logits.shape[0] == 0
    stats = m.routing_stats
    assert stats["routed_per_expert"].sum() == 0 and stats["tokens_per_expert"].sum() == 0
    assert float(stats["dropped_fraction"]) == 0.0
    (y.sum() + m.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == shape
    for n, b in m.named_buffers():  # no load, no bias update (sign(0) = 0)
        assert torch.equal(b, bias_before[n]), n


# --- randomness ----------------------------------------------------------------------------------

RANDOM_SPECS = {
    "jitter+position-capacity": ("debug-base.yaml", ()),
    "fixed-noise+random-drops": (
        "debug-tiny.yaml",
        (
            "layer.router.noise={kind: fixed, std: 0.5}",
            "layer.capacity={kind: factor, train_factor: 0.75, eval_factor: 1.0, drop_policy: random}",
        ),
    ),
    "learned-noise": (
        "debug-tiny.yaml",
        ("layer.router.noise={kind: learned}", "layer.router.order=topk_then_softmax"),
    ),
    "gshard-sampling": ("debug-tiny.yaml", ("layer.router.second_expert_policy=sampling",)),
    "gshard-random": ("debug-tiny.yaml", ("layer.router.second_expert_policy=random",)),
}


def _build_random(case: str, gen_seed: int | None) -> MoELayer:
    path, overrides = RANDOM_SPECS[case]
    gen = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
    return moespec.build(SPECS / path, overrides, seed=1, generator=gen).train()


def _run(m: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    y = m(x)
    return y.detach(), m.aux_loss.detach(), m.routing_stats["tokens_per_expert"].tolist()


@pytest.mark.parametrize("case", list(RANDOM_SPECS))
def test_seeded_generator_makes_training_reproducible(case: str) -> None:
    x = x_of(4, 16, D)
    a, b, c = _build_random(case, 7), _build_random(case, 7), _build_random(case, 8)
    torch.manual_seed(123)
    before = torch.rand(3)
    ra = [_run(a, x) for _ in range(3)]
    torch.manual_seed(123)  # the global RNG state must not matter, nor be consumed
    rb = [_run(b, x) for _ in range(3)]
    assert torch.equal(torch.rand(3), before)
    for (ya, aa, ca), (yb, ab, cb) in zip(ra, rb, strict=True):
        assert torch.equal(ya, yb) and torch.equal(aa, ab) and ca == cb
    # The generator advances: successive calls draw fresh randomness; another seed differs.
    assert not torch.equal(ra[0][0], ra[1][0])
    assert not torch.equal(ra[0][0], _run(c, x)[0])


@pytest.mark.parametrize("case", list(RANDOM_SPECS))
def test_global_rng_is_used_without_generator(case: str) -> None:
    x = x_of(4, 16, D)
    a, b = _build_random(case, None), _build_random(case, None)
    torch.manual_seed(5)
    ya = _run(a, x)
    torch.manual_seed(5)
    yb = _run(b, x)
    assert torch.equal(ya[0], yb[0]) and torch.equal(ya[1], yb[1])


@pytest.mark.parametrize("case", ["jitter+position-capacity", "learned-noise"])
def test_eval_is_deterministic(case: str) -> None:
    """Jitter and noise are training-only (GShard policies and random drops draw in eval
    too, by design; see moespec.reference.routing)."""
    m = _build_random(case, 7).eval()
    x = x_of(4, 16, D)
    assert torch.equal(m(x), m(x))


# --- aux-loss-free expert bias ---------------------------------------------------------------

EXPERT_BIAS_SPEC = {
    "moespec": 1,
    "name": "expert-bias",
    "d_model": 16,
    "layer": {
        "experts": {"routed": [{"kind": "glu", "activation": "silu", "d_ff": 8, "count": 8}]},
        "router": {
            "kind": "topk",
            "k": 2,
            "score": "sigmoid",
            "renormalize": True,
            "expert_bias": {"update_rate": 0.01},
        },
    },
}


def _skewed_layer() -> tuple[MoELayer, torch.Tensor]:
    m = moespec.build(EXPERT_BIAS_SPEC)
    with torch.no_grad():
        m.router.weight.mul_(20.0)  # confident router: a clearly unbalanced load
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    return m, x


def test_expert_bias_moves_toward_balance_in_training() -> None:
    m, x = _skewed_layer()
    m.train()
    before = m.router.expert_bias.clone()
    m(x)
    load = m.routing_stats["routed_per_expert"].to(torch.float32)
    step = m.router.expert_bias - before
    over, under = load > load.mean(), load < load.mean()
    assert over.any() and under.any(), load
    torch.testing.assert_close(step[over], torch.full_like(step[over], -0.01))  # overloaded: down
    torch.testing.assert_close(step[under], torch.full_like(step[under], 0.01))  # underloaded: up
    assert not m.router.expert_bias.requires_grad

    # Repeated training steps on the same tokens balance the load.
    first = load.clone()
    for _ in range(60):
        with torch.no_grad():
            m(x)
    last = m.routing_stats["routed_per_expert"].to(torch.float32)
    assert (last.max() - last.min()) < (first.max() - first.min()) / 2, (first, last)


def test_expert_bias_is_frozen_in_eval() -> None:
    m, x = _skewed_layer()
    m.eval()
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    before = m.router.expert_bias.clone()
    m(x)
    m(x)
    assert torch.equal(m.router.expert_bias, before)


# --- aux_losses ----------------------------------------------------------------------------------


def test_aux_losses_sums_every_layer() -> None:
    l1 = moespec.build(TINY, seed=1)
    l2 = moespec.build(SPECS / "debug-capacity.yaml", seed=2)  # z-loss only
    model = nn.Sequential(nn.Linear(D, D), l1, nn.Sequential(nn.GELU(), l2))
    total = moespec.aux_losses(model)
    assert total.shape == () and float(total) == 0.0  # nothing ran yet
    model(x_of(3, 5, D))
    total = moespec.aux_losses(model)
    assert float(l1.aux_loss.detach()) > 0 and float(l2.aux_loss.detach()) > 0
    torch.testing.assert_close(total, l1.aux_loss + l2.aux_loss)
    total.backward()
    assert l1.router.weight.grad is not None and l2.router.weight.grad is not None
    assert float(moespec.aux_losses(nn.Linear(2, 2))) == 0.0  # no moespec layer at all


# --- calling conventions -------------------------------------------------------------------------


def test_two_forwards_then_one_backward() -> None:
    """Gradient accumulation: the expert bias is updated in place between the two calls
    and backward through both still gives the sum of each call's own gradients."""
    m = moespec.build(SPECS / "debug-capacity.yaml", seed=3).train()
    x1, x2 = x_of(12, D, seed=1), x_of(12, D, seed=2)
    snapshots = []
    losses = []
    for x in (x1, x2):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        y = m(x)
        losses.append(y.square().sum() + m.aux_loss)
    assert not torch.equal(snapshots[0]["router.expert_bias"], snapshots[1]["router.expert_bias"])
    sum(losses).backward()
    want = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for x, state in zip((x1, x2), snapshots, strict=True):
        ref = moespec.build(SPECS / "debug-capacity.yaml").train()
        ref.load_state_dict(state)
        y = ref(x)
        (y.square().sum() + ref.aux_loss).backward()
        for n, p in ref.named_parameters():
            want[n] += p.grad
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


@pytest.mark.parametrize("training", [False, True])
def test_inference_mode(training: bool) -> None:
    m = moespec.build(SPECS / "debug-capacity.yaml").train(training)
    with torch.inference_mode():
        y = m(x_of(6, D))
    assert y.shape == (6, D) and bool(y.isfinite().all())
    m.train()
    x = x_of(6, D).requires_grad_()
    (m(x).sum() + m.aux_loss).backward()  # the buffer touched in inference mode still trains
    assert x.grad is not None
