"""Reference capacity: the C formula, the four drop policies, dropless, edge cases.

Shape legend: T tokens, D d_model, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moespec.reference import RoutingResult, apply_capacity, expert_capacity, route_topk
from moespec.spec.routers import TopKRouter
from moespec.spec.sparsity import CapacityFactor, Dropless


def cap_spec(**kw: object) -> CapacityFactor:
    base = {"kind": "factor", "train_factor": 1.0, "eval_factor": 2.0, "min_capacity": 0}
    return CapacityFactor.model_validate({**base, **kw})


def routing(t: int, e: int = 8, k: int = 2, seed: int = 0, **kw: object) -> RoutingResult:
    g = torch.Generator().manual_seed(seed)
    x_TD, w_ED = torch.randn(t, 48, generator=g), torch.randn(e, 48, generator=g) * 0.5
    spec = TopKRouter.model_validate({"kind": "topk", "k": k, **kw})
    return route_topk(x_TD, w_ED, spec, n_experts=e, training=False)


def fixed_routing(idx_TK: list[list[int]], w_TK: list[list[float]], e: int) -> RoutingResult:
    idx = torch.tensor(idx_TK)
    t = idx.shape[0]
    z = torch.zeros(t, e)
    return RoutingResult(z, z, None, z, idx, torch.tensor(w_TK), torch.ones_like(idx, dtype=torch.bool), e)


def test_capacity_formula() -> None:
    assert expert_capacity(1.25, 64, 2, 8, 4) == 20
    assert expert_capacity(1.0, 7, 2, 8, 0) == math.ceil(14 / 8) == 2
    assert expert_capacity(1.0, 1, 1, 8, 4) == 4  # min_capacity wins
    assert expert_capacity(0.1, 64, 1, 8, 0) == 1


@pytest.mark.parametrize("policy", ["position", "score", "batch_priority", "random"])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_never_exceeds_capacity(policy: str, t: int) -> None:
    r = routing(t, seed=t)
    res = apply_capacity(
        r, cap_spec(drop_policy=policy), training=True, generator=torch.Generator().manual_seed(0)
    )
    assert res.capacity == expert_capacity(1.0, t, 2, 8, 0)
    counts = r.tokens_per_expert(res.keep_TK)
    assert (counts <= res.capacity).all()
    # experts are filled up to min(routed, C): nothing is dropped needlessly
    assert torch.equal(counts, r.tokens_per_expert().clamp(max=res.capacity))
    assert res.n_dropped == int((~res.keep_TK).sum())
    assert res.dropped_fraction == pytest.approx(res.n_dropped / (2 * t))


def test_train_and_eval_factors() -> None:
    r = routing(64)
    assert apply_capacity(r, cap_spec(), training=True).capacity == 16
    assert apply_capacity(r, cap_spec(), training=False).capacity == 32


def test_position_policy_keeps_earliest_tokens() -> None:
    # every token's first choice is expert 0: the first C tokens are kept
    r = fixed_routing([[0, 1 + t % 3] for t in range(10)], [[0.6, 0.4]] * 10, e=4)
    res = apply_capacity(r, cap_spec(train_factor=0.8), training=True)  # C = ceil(0.8*20/4) = 4
    assert res.capacity == 4
    assert res.keep_TK[:, 0].tolist() == [True] * 4 + [False] * 6


def test_position_policy_serves_top1_before_top2() -> None:
    # Token 0 picks expert 0 second; tokens 1..4 pick it first. With C = 4 (GShard order)
    # the late first choices win over the early second choice.
    idx = [[1, 0], [0, 1], [0, 2], [0, 3], [0, 1]]
    r = fixed_routing(idx, [[0.9, 0.1]] + [[0.5, 0.5]] * 4, e=4)
    res = apply_capacity(r, cap_spec(train_factor=1.0, min_capacity=4), training=True)
    assert res.capacity == 4
    assert res.keep_TK[0].tolist() == [True, False]
    assert res.keep_TK[1:, 0].all()


def test_score_policy_keeps_highest_weights() -> None:
    r = routing(64, seed=1)
    res = apply_capacity(r, cap_spec(drop_policy="score", train_factor=0.5), training=True)
    for e in range(8):
        on_e = r.topk_idx_TK == e
        kept, dropped = r.topk_weight_TK[on_e & res.keep_TK], r.topk_weight_TK[on_e & ~res.keep_TK]
        if dropped.numel():
            assert kept.min() >= dropped.max()


def test_score_policy_by_hand() -> None:
    r = fixed_routing([[0], [0], [0], [0]], [[0.2], [0.9], [0.5], [0.7]], e=4)
    res = apply_capacity(r, cap_spec(drop_policy="score", train_factor=2.0), training=True)  # C = 2
    assert res.keep_TK[:, 0].tolist() == [False, True, False, True]


# Hand-computed (issue 20 §1). T 4, E 2, k 2, C = ceil(0.75 * 4 * 2 / 2) = 3. Every first
# choice fits (2 per expert); one second-choice seat is left on each expert.
#   token:        t0          t1          t2          t3
#   choices:  e0 .6 e1 .4  e1 .9 e0 .1  e0 .7 e1 .3  e1 .55 e0 .45
# position:       second choices in token order: t0->e1, t1->e0 kept; t2, t3 dropped.
# score:          by slot weight: t3->e0 (.45) and t0->e1 (.4) take the seats.
# batch_priority: tokens by top weight t1 (.9), t2 (.7), t0 (.6), t3 (.55): t1->e0 and t2->e1.
BPR_IDX = [[0, 1], [1, 0], [0, 1], [1, 0]]
BPR_W = [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.55, 0.45]]
BPR_SECOND_KEPT = {
    "position": [True, True, False, False],
    "score": [True, False, False, True],
    "batch_priority": [False, True, True, False],
}


def op_keep(
    idx_TK: list[list[int]], w_TK: list[list[float]], e: int, factor: float, policy: str
) -> list[list[bool]]:
    """The fast path's ``moespec::capacity_keep`` on the same slots (min_capacity 0)."""
    import moespec.ops  # noqa: F401  (registers torch.ops.moespec)

    idx, w = torch.tensor(idx_TK), torch.tensor(w_TK)
    active = torch.ones_like(idx, dtype=torch.bool)
    return torch.ops.moespec.capacity_keep(idx, w, active, torch.zeros_like(w), e, factor, 0, policy).tolist()


@pytest.mark.parametrize("policy", list(BPR_SECOND_KEPT))
def test_second_choice_seats_by_hand(policy: str) -> None:
    res = apply_capacity(
        fixed_routing(BPR_IDX, BPR_W, e=2), cap_spec(drop_policy=policy, train_factor=0.75), training=True
    )
    assert res.capacity == 3
    want = [[True, second] for second in BPR_SECOND_KEPT[policy]]
    assert res.keep_TK.tolist() == want
    assert op_keep(BPR_IDX, BPR_W, 2, 0.75, policy) == want


def test_batch_priority_serves_first_choices_first() -> None:
    # T 2, E 3, k 2, C = ceil(0.75 * 2 * 2 / 3) = 1. Token a: e0 .5, e1 .45; token b: e1 .4, e2 .35.
    # `score` gives e1 to a's second choice (.45 > .4), dropping b's first choice; V-MoE's BPR
    # serves b's first choice on e1 before any second choice.
    r = fixed_routing([[0, 1], [1, 2]], [[0.5, 0.45], [0.4, 0.35]], e=3)
    spec = {"train_factor": 0.75}
    assert apply_capacity(r, cap_spec(drop_policy="score", **spec), training=True).keep_TK.tolist() == [
        [True, True],
        [False, True],
    ]
    assert apply_capacity(
        r, cap_spec(drop_policy="batch_priority", **spec), training=True
    ).keep_TK.tolist() == [[True, False], [True, True]]
    assert op_keep([[0, 1], [1, 2]], [[0.5, 0.45], [0.4, 0.35]], 3, 0.75, "score") == [
        [True, True],
        [False, True],
    ]
    assert op_keep([[0, 1], [1, 2]], [[0.5, 0.45], [0.4, 0.35]], 3, 0.75, "batch_priority") == [
        [True, False],
        [True, True],
    ]


def test_batch_priority_ties_by_position() -> None:
    # Equal top weights: the earlier token is served first. C = ceil(0.5 * 4 * 1 / 2) = 1.
    r = fixed_routing([[1], [0], [0], [1]], [[0.5], [0.5], [0.5], [0.5]], e=2)
    res = apply_capacity(r, cap_spec(drop_policy="batch_priority", train_factor=0.5), training=True)
    assert res.keep_TK[:, 0].tolist() == [True, True, False, False]
    assert op_keep([[1], [0], [0], [1]], [[0.5]] * 4, 2, 0.5, "batch_priority") == [
        [True],
        [True],
        [False],
        [False],
    ]


def test_random_policy_is_seeded() -> None:
    r = routing(64, seed=2)
    spec = cap_spec(drop_policy="random", train_factor=0.5)
    a = apply_capacity(r, spec, training=True, generator=torch.Generator().manual_seed(0))
    b = apply_capacity(r, spec, training=True, generator=torch.Generator().manual_seed(0))
    c = apply_capacity(r, spec, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.keep_TK, b.keep_TK) and not torch.equal(a.keep_TK, c.keep_TK)
    with pytest.raises(ValueError, match="Generator"):
        apply_capacity(r, spec, training=True)


def test_dropless_keeps_every_active_slot() -> None:
    r = routing(64)
    res = apply_capacity(r, Dropless(kind="dropless"), training=True)
    assert res.keep_TK.all() and res.capacity is None and res.dropped_fraction == 0.0


def test_expert_with_no_tokens_and_all_on_one_expert() -> None:
    r = fixed_routing([[2]] * 7, [[1.0]] * 7, e=4)
    res = apply_capacity(r, cap_spec(min_capacity=3), training=True)
    counts = r.tokens_per_expert(res.keep_TK)
    assert counts.tolist() == [0, 0, 3, 0]
    assert res.n_dropped == 4 and res.dropped_fraction == pytest.approx(4 / 7)
    s = r.to_sorted(res.keep_TK)
    assert s.token_idx_N.tolist() == [0, 1, 2] and s.offsets_E1.tolist() == [0, 0, 0, 3, 3]


def test_inactive_second_slots_take_no_capacity() -> None:
    r = route_topk(
        torch.randn(64, 48, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, 48, generator=torch.Generator().manual_seed(1)),
        TopKRouter.model_validate({"kind": "topk", "k": 2, "second_expert_policy": "random"}),
        n_experts=4,
        training=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert not r.active_TK.all()
    res = apply_capacity(r, cap_spec(train_factor=4.0), training=True)  # C = 128: no drops
    assert torch.equal(res.keep_TK, r.active_TK) and res.n_dropped == 0
