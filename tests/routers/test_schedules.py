"""Step schedules (`schedules:`) and SMoE-Dropout: a frozen random router with k(t)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec.reference import moe_layer_reference
from moespec.runtime.schedules import evaluate
from moespec.spec.schedules import (
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    MultiStepSchedule,
    round_half_even,
)

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = str(SPECS / "debug-tiny.yaml")
K_SCHED = "layer.schedules=[{param: router.k, kind: linear, start: 1, end: 4, steps: 30}]"


def _k_smoe(t: int, k_min: int, k_max: int, total: int) -> int:
    """SMoE-Dropout's calculate_gate_number (linear_increase), written independently: Python's
    round, halves to even."""
    return min(k_max, round((k_max - k_min) * min(t, total) / total) + k_min)


@pytest.mark.parametrize(
    "sched",
    [
        LinearSchedule(param="router.k", kind="linear", start=8, end=16, steps=400),
        LinearSchedule(param="router.k", kind="linear", start=16, end=2, steps=50, start_step=10),
        CosineSchedule(param="router.k", kind="cosine", start=1, end=8, steps=64),
        ExponentialSchedule(param="router.k", kind="exponential", start=1, end=16, steps=40),
        MultiStepSchedule(param="router.k", kind="multistep", milestones=[5, 9, 20], values=[1, 2, 4, 8]),
    ],
)
def test_tensor_evaluation_matches_the_definition(sched):
    for step in [0, 1, 4, 5, 9, 10, 19, 20, 33, 64, 200, 400, 10**6]:
        got = evaluate(sched, torch.tensor(step), integer=True)
        assert got.dtype == torch.int64
        v = sched.value(step)
        assert int(got) == round(v), (step, v)
        f = evaluate(sched, torch.tensor(step), integer=False)
        assert float(f) == pytest.approx(v, rel=1e-6)


def test_linear_is_smoe_dropouts_k_schedule():
    sched = LinearSchedule(param="router.k", kind="linear", start=8, end=16, steps=400000)
    for t in [0, 1, 24999, 25000, 25001, 75000, 100000, 125000, 399999, 400000, 500000]:
        assert int(evaluate(sched, torch.tensor(t), integer=True)) == _k_smoe(t, 8, 16, 400000)


@pytest.mark.parametrize(
    "step,k",
    [
        # 8·t/400000 is exactly n + 1/2 at these steps: the released code's round() goes to even.
        (25000, 8),  # 0.5 -> 0
        (125000, 10),  # 2.5 -> 2
        (225000, 12),  # 4.5 -> 4
        (325000, 14),  # 6.5 -> 6
        (75000, 10),  # 1.5 -> 2
        (25001, 9),  # 0.50002 -> 1
        (110000, 10),  # 2.2 -> 2
        (300000, 14),  # 6.0
    ],
)
def test_smoe_dropout_k_rounds_half_to_even(step, k):
    m = moespec.build(str(SPECS / "smoe-dropout.yaml"), ("d_model=32", "layer.experts.routed.0.d_ff=8"))
    m.set_step(step)
    got = m.schedule_values()["router.k"]
    assert got.dtype == torch.int64 and int(got) == k


def test_round_half_even_on_floats_and_tensors():
    halves = [n / 2 for n in range(-9, 10)] + [0.49999999999999994, 2.4999999, 2.5000001, -1.5000001]
    assert [round_half_even(v) for v in halves] == [round(v) for v in halves]
    t = torch.tensor(halves, dtype=torch.float64)
    assert torch.equal(round_half_even(t), torch.round(t))


def test_range_check_rounds_like_the_module():
    # linear 1 -> 2.5 with k 2: 2.5 rounds to 2 (half to even), in range; 3.5 would round to 4
    ok = "layer.schedules=[{param: router.k, kind: linear, start: 1, end: 2.5, steps: 4}]"
    m = moespec.build(TINY, (ok,))
    m.set_step(4)
    assert int(m.schedule_values()["router.k"]) == 2
    with pytest.raises(moespec.SpecError, match=r"router\.k must stay in 1\.\.2"):
        moespec.load_spec(TINY, (ok.replace("end: 2.5", "end: 2.50001"),))


def _reference_at(m, x, spec_path, overrides, k_t, training, temperature=None):
    full = moespec.load_spec(spec_path, overrides).spec
    layer = full.layer
    update = {"k": k_t} if k_t is not None else {}
    if temperature is not None:
        update["temperature"] = temperature
    layer = layer.model_copy(update={"router": layer.router.model_copy(update=update), "schedules": []})
    params = {
        k: v.detach().clone().requires_grad_(v.is_floating_point() and "step" not in k)
        for k, v in m.state_dict().items()
    }
    y, aux, stats = moe_layer_reference(x, params, layer, full.d_model, training=training)
    return y, aux, stats, params


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "variant",
    [
        (),
        ("layer.router.order=topk_then_softmax", "~layer.router.renormalize"),
        ("~layer.router.renormalize",),
        # the unbiased top-k count follows the step's k (a 0-dim tensor in the graph)
        ("layer.router.score=sigmoid", "layer.losses.load_balance.count=unbiased_topk"),
    ],
)
def test_scheduled_k_matches_a_fixed_k_reference(variant, training):
    over = (
        "layer.router.k=4",
        K_SCHED,
        "layer.losses={load_balance: {kind: switch, weight: 0.1}, z_loss: {weight: 0.01}}",
        *variant,
    )
    m = moespec.build(TINY, over, seed=2).train(training)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    for step, k_t in [(0, 1), (10, 2), (20, 3), (30, 4), (99, 4)]:
        m.set_step(step)
        assert int(m.schedule_values()["router.k"]) == k_t
        m.zero_grad()
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = m(x1)
        y2, a2, stats, params = _reference_at(m, x2, TINY, over, k_t, training)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.aux_loss, a2, atol=1e-6, rtol=1e-5)
        assert m.routing_stats["tokens_per_expert"].tolist() == stats.tokens_per_expert.tolist()
        (y1.square().sum() + m.aux_loss).backward()
        (y2.square().sum() + a2).backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
        for name, p in m.named_parameters():
            ref = params[name].grad if params[name].grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(
                p.grad if p.grad is not None else torch.zeros_like(p), ref, atol=1e-5, rtol=1e-4, msg=name
            )


def test_scheduled_temperature():
    over = ("layer.schedules=[{param: router.temperature, kind: cosine, start: 2.0, end: 0.5, steps: 10}]",)
    m = moespec.build(TINY, over, seed=1).eval()
    x = torch.randn(9, 32)
    for step in (0, 5, 10):
        m.set_step(step)
        tau = CosineSchedule(param="router.temperature", kind="cosine", start=2.0, end=0.5, steps=10).value(
            step
        )
        y2, _, _, _ = _reference_at(m, x, TINY, over, None, False, temperature=tau)
        torch.testing.assert_close(m(x), y2, atol=1e-5, rtol=1e-5)


def test_set_step_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    m = moespec.build(TINY, ("layer.router.k=4", K_SCHED)).eval()
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    x = torch.randn(8, 32)
    outs = []
    for step in (0, 10, 20, 30):
        m.set_step(step)
        outs.append(compiled(x))
        torch.testing.assert_close(outs[-1], m(x))
    assert counter.frame_count == 1
    assert not torch.equal(outs[0], outs[-1])  # k went from 1 to 4


def test_smoe_dropout_spec_frozen_router_and_state():
    m = moespec.build(str(SPECS / "smoe-dropout.yaml"), ("d_model=32", "layer.experts.routed.0.d_ff=8"))
    names = dict(m.named_parameters())
    assert "router.weight" not in names and "router.bias" not in names
    sd = m.state_dict()
    assert {"router.weight", "router.bias", "schedule.step"} <= set(sd)
    moespec.set_step(torch.nn.Sequential(m), 200000)
    assert int(m.schedule_values()["router.k"]) == 12 and int(sd["schedule.step"]) == 200000
    y = m(torch.randn(5, 32, requires_grad=True))
    y.sum().backward()
    assert m.router.weight.grad is None
    assert int(m.routing_stats["routed_per_expert"].sum()) == 5 * 12


def test_smoe_dropout_numbers(explain_layer):
    layer = explain_layer(SPECS / "smoe-dropout.yaml")
    d, f = 256, 512  # smoe_dropout.sh: --d_model 256 --d_inner 512 (every expert full width)
    expert = 2 * d * f + f + d
    assert layer["params_total"] == 16 * expert  # the frozen router is a buffer, not a parameter
    assert layer["params_active"] == 16 * expert  # k's compiled maximum: 16
    assert layer["flops_per_token"] == 2 * (d * 16 + 16 * 2 * d * f)


@pytest.mark.parametrize(
    "schedules,expect",
    [
        (
            "[{param: router.bogus, kind: linear, start: 1, end: 2, steps: 5}]",
            "cannot be scheduled for a topk router",
        ),
        ("[{param: router.k, kind: linear, start: 1, end: 5, steps: 5}]", "router.k must stay in 1..2"),
        ("[{param: router.k, kind: linear, start: 0, end: 2, steps: 5}]", "router.k must stay in 1..2"),
        ("[{param: router.temperature, kind: linear, start: 1, end: 0, steps: 5}]", "must stay > 0"),
        ("[{param: router.k, kind: multistep, milestones: [3, 2], values: [1, 2]}]", "one more value"),
        (
            "[{param: router.k, kind: multistep, milestones: [3, 2], values: [1, 2, 2]}]",
            "milestones must increase",
        ),
        (
            "[{param: router.k, kind: linear, start: 1, end: 2, steps: 5}, "
            "{param: router.k, kind: cosine, start: 1, end: 2, steps: 5}]",
            "scheduled twice",
        ),
        ("[{param: router.k, kind: linear, start: 1, end: 2, steps: 0}]", "greater than 0"),
    ],
)
def test_bad_schedules(schedules, expect):
    with pytest.raises(moespec.SpecError, match=expect):
        moespec.load_spec(TINY, (f"layer.schedules={schedules}",))


def test_scheduled_k_needs_dropless_capacity():
    cap = "layer.capacity={kind: factor, train_factor: 1.0, eval_factor: 1.0}"
    with pytest.raises(
        moespec.SpecError, match=r"layer\.capacity: a scheduled router\.k needs capacity: dropless"
    ):
        moespec.load_spec(TINY, (K_SCHED.replace("end: 4", "end: 2"), cap))
