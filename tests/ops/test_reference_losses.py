"""Reference auxiliary losses: values at uniform routing, hand-computed cases, the smooth
load estimator, per-sequence scope and gradient flow to the router.

Shape legend: T tokens, D d_model, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moespec.common.losses import normal_cdf, unbiased_topk_TE
from moespec.reference import (
    RoutingResult,
    aux_losses,
    cv_squared,
    gshard_loss,
    route_topk,
    smooth_load,
    switch_loss,
    z_loss,
)
from moespec.spec.routers import TopKRouter
from moespec.spec.sparsity import LossesSpec


def balanced_selection(t: int, e: int, k: int) -> torch.Tensor:
    """Token t picks experts (t*k + j) mod E: every expert gets T*k/E slots."""
    sel = torch.zeros(t, e, dtype=torch.bool)
    for i in range(t):
        for j in range(k):
            sel[i, (i * k + j) % e] = True
    return sel


@pytest.mark.parametrize(("t", "e", "k"), [(8, 8, 1), (8, 4, 2), (64, 8, 2), (6, 6, 3)])
def test_balance_losses_are_one_at_uniform_routing(t: int, e: int, k: int) -> None:
    p_TE = torch.full((t, e), 1.0 / e)
    sel_TE = balanced_selection(t, e, k)
    torch.testing.assert_close(switch_loss(p_TE, sel_TE, k), torch.tensor(1.0))
    top1_T = torch.tensor([(i * k) % e for i in range(t)])
    torch.testing.assert_close(gshard_loss(p_TE, top1_T), torch.tensor(1.0))


def test_switch_loss_by_hand() -> None:
    # all tokens on expert 0 with p = one-hot: E * 1 * 1 = E (the maximum)
    p_TE = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    sel_TE = p_TE.bool()
    torch.testing.assert_close(switch_loss(p_TE, sel_TE, 1), torch.tensor(4.0))
    # T=2, E=2, k=1: f = [1, 0], P = [0.7, 0.3] -> 2 * 0.7
    p_TE = torch.tensor([[0.6, 0.4], [0.8, 0.2]])
    torch.testing.assert_close(switch_loss(p_TE, p_TE > 0.5, 1), torch.tensor(1.4))


def test_gshard_loss_uses_top1_only() -> None:
    p_TE = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    # me = [0.3, 0.45, 0.25], ce = [0.5, 0.5, 0] -> 9 * mean([0.15, 0.225, 0]) = 1.125
    torch.testing.assert_close(gshard_loss(p_TE, torch.tensor([0, 1])), torch.tensor(1.125))


def test_z_loss_by_hand() -> None:
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = [log 2, log 4]
    expect = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(z_loss(logits_TE), torch.tensor(expect))


def test_cv_squared() -> None:
    assert cv_squared(torch.full((8,), 3.0)).item() == 0.0
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 3.0])), torch.tensor(0.25))  # population var


def kth_largest_excluding(v: list[float], e: int, k: int) -> float:
    others = sorted((x for i, x in enumerate(v) if i != e), reverse=True)
    return others[k - 1]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_threshold_by_brute_force(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    clean_TE = torch.randn(7, 5, generator=g)
    std_TE = torch.rand(7, 5, generator=g) + 0.5
    noisy_TE = clean_TE + torch.randn(7, 5, generator=g) * std_TE
    load = torch.zeros(5)
    for t in range(7):
        for e in range(5):
            thr = kth_largest_excluding(noisy_TE[t].tolist(), e, k)
            load[e] += normal_cdf(torch.tensor((clean_TE[t, e].item() - thr) / std_TE[t, e].item()))
    torch.testing.assert_close(smooth_load(clean_TE, noisy_TE, std_TE, k), load)
    # k = E: every expert is always in the top-k
    torch.testing.assert_close(smooth_load(clean_TE, noisy_TE, std_TE, 5), torch.full((5,), 7.0))


def test_smooth_load_is_the_probability_of_staying_in_topk() -> None:
    # Monte Carlo: redraw expert e's noise only, count how often it is in the top-k.
    clean = torch.tensor([[0.3, -0.2, 0.1, 0.0]])
    std = torch.tensor([[0.5, 0.8, 0.3, 1.0]])
    noisy = clean + torch.tensor([[0.2, -0.1, 0.4, -0.3]]) * std
    k, n = 2, 20000
    load = smooth_load(clean, noisy, std, k)
    g = torch.Generator().manual_seed(0)
    for e in range(4):
        draws = noisy.repeat(n, 1)
        draws[:, e] = clean[0, e] + torch.randn(n, generator=g) * std[0, e]
        in_top = (draws.topk(k, dim=-1).indices == e).any(-1).float().mean()
        assert abs(in_top.item() - load[e].item()) < 0.015


def routed(t: int = 16, **kw: object) -> tuple[RoutingResult, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(t, 48, generator=g)
    w_ED = (torch.randn(8, 48, generator=g) * 0.3).requires_grad_()
    wn_ED = (torch.randn(8, 48, generator=g) * 0.1).requires_grad_()
    spec = TopKRouter.model_validate({"kind": "topk", "k": 2, **kw})
    r = route_topk(
        x_TD,
        w_ED,
        spec,
        n_experts=8,
        training=True,
        generator=torch.Generator().manual_seed(1),
        noise_w_ED=wn_ED,
    )
    return r, w_ED, wn_ED


def losses(lb: dict[str, object] | None, z: float | None = None) -> LossesSpec:
    spec: dict[str, object] = {}
    if lb is not None:
        spec["load_balance"] = lb
    if z is not None:
        spec["z_loss"] = {"weight": z}
    return LossesSpec.model_validate(spec)


@pytest.mark.parametrize(
    "lb",
    [
        {"kind": "switch", "weight": 0.01},
        {"kind": "gshard", "weight": 0.01},
        {"kind": "importance_load_cv2", "importance_weight": 0.1, "load_weight": 0.1},
    ],
)
def test_gradient_flows_from_aux_loss_to_router(lb: dict[str, object]) -> None:
    r, w_ED, wn_ED = routed(noise={"kind": "learned"})
    total, parts = aux_losses(r, losses(lb, z=1e-3), score="softmax")
    assert set(parts) == {"load_balance", "z_loss"}
    total.backward()
    assert w_ED.grad is not None and w_ED.grad.abs().sum() > 0
    if lb["kind"] == "importance_load_cv2":  # the smooth load reaches W_noise through sigma
        assert wn_ED.grad is not None and wn_ED.grad.abs().sum() > 0


def test_aux_loss_is_the_weighted_sum() -> None:
    r, _, _ = routed()
    total, parts = aux_losses(r, losses({"kind": "switch", "weight": 0.01}, z=1e-3), score="softmax")
    torch.testing.assert_close(total, 0.01 * parts["load_balance"] + 1e-3 * parts["z_loss"])
    torch.testing.assert_close(parts["z_loss"], z_loss(r.logits_TE))
    sel = r.selected_TE()
    torch.testing.assert_close(parts["load_balance"], switch_loss(r.probs_TE, sel, 2))
    zero, none = aux_losses(r, losses(None), score="softmax")
    assert zero.item() == 0.0 and none == {}


def test_importance_load_without_noise_uses_hard_counts() -> None:
    r, _, _ = routed()
    _, parts = aux_losses(
        r,
        losses({"kind": "importance_load_cv2", "importance_weight": 1.0, "load_weight": 2.0}),
        score="softmax",
    )
    expect = cv_squared(r.gates_TE().sum(0)) + 2.0 * cv_squared(r.tokens_per_expert().float())
    torch.testing.assert_close(parts["load_balance"], expect)


@pytest.mark.parametrize("kind", ["switch", "gshard"])
def test_sequence_scope_averages_per_sequence(kind: str) -> None:
    r, _, _ = routed(t=12)
    spec = losses({"kind": kind, "weight": 1.0, "scope": "sequence"})
    _, parts = aux_losses(r, spec, score="softmax", seq_len=4)
    per_seq = []
    for s in range(3):
        sl = slice(4 * s, 4 * s + 4)
        if kind == "switch":
            per_seq.append(switch_loss(r.probs_TE[sl], r.selected_TE()[sl], 2))
        else:
            per_seq.append(gshard_loss(r.probs_TE[sl], r.topk_idx_TK[sl, 0]))
    torch.testing.assert_close(parts["load_balance"], torch.stack(per_seq).mean())
    _, batch = aux_losses(r, losses({"kind": kind, "weight": 1.0}), score="softmax", seq_len=4)
    assert not torch.allclose(batch["load_balance"], parts["load_balance"])


def test_sigmoid_scores_are_normalised_for_the_balance_loss() -> None:
    # equal sigmoid scores everywhere and balanced selection -> exactly 1
    p_TE = torch.full((8, 4), 0.3)
    r = RoutingResult(
        p_TE, p_TE, None, p_TE, balanced_selection(8, 4, 2).nonzero()[:, 1].view(8, 2),
        torch.full((8, 2), 0.3), torch.ones(8, 2, dtype=torch.bool), 4,
    )  # fmt: skip
    _, parts = aux_losses(r, losses({"kind": "switch", "weight": 1.0}), score="sigmoid")
    torch.testing.assert_close(parts["load_balance"], torch.tensor(1.0))


def test_unbiased_topk_count_by_hand() -> None:
    # DeepSeek-V3 eq. 17-20, T=2, E=4, k=2, sigmoid scores s chosen through their logits:
    #   s_0 = [0.8, 0.6, 0.4, 0.2] (sum 2) -> s'_0 = [0.4, 0.3, 0.2, 0.1]
    #   s_1 = [0.5, 0.25, 0.15, 0.1] (sum 1) -> s'_1 = s_1
    #   P = mean_t s' = [0.45, 0.275, 0.175, 0.1]
    # The expert bias b = [0, 0, 0.5, 0] moves expert 2 into both selections: {2, 0} for both
    # tokens, f = count / (T k) = [0.5, 0, 0.5, 0], L = 4 (0.5·0.45 + 0.5·0.175) = 1.25.
    # The paper's TopK of the unbiased s is {0, 1} for both: f = [0.5, 0.5, 0, 0],
    # L = 4 (0.5·0.45 + 0.5·0.275) = 1.45 (= sum_i f'_i P_i with f'_i = N_r/(K_r T) count_i = 2).
    s_TE = torch.tensor([[0.8, 0.6, 0.4, 0.2], [0.5, 0.25, 0.15, 0.1]], dtype=torch.float64)
    spec = TopKRouter.model_validate({"kind": "topk", "k": 2, "score": "sigmoid"})
    r = route_topk(
        torch.logit(s_TE), torch.eye(4, dtype=torch.float64), spec, n_experts=4, training=False,
        expert_bias_E=torch.tensor([0.0, 0.0, 0.5, 0.0], dtype=torch.float64), default_dtype="fp64",
    )  # fmt: skip
    assert r.topk_idx_TK.tolist() == [[2, 0], [2, 0]]  # the bias changed the selection
    by_count = {}
    for count in ("selection", "unbiased_topk"):
        lb = {"kind": "switch", "weight": 1.0, "scope": "sequence", "count": count}
        _, parts = aux_losses(r, losses(lb), score="sigmoid", seq_len=2)
        by_count[count] = parts["load_balance"].item()
    assert by_count["selection"] == pytest.approx(1.25, abs=1e-12)
    assert by_count["unbiased_topk"] == pytest.approx(1.45, abs=1e-12)


def test_unbiased_topk_ties_and_a_tensor_k() -> None:
    p_TE = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.25, 0.25, 0.3, 0.2]])
    # ties go to the lower index; k may be a 0-dim tensor (a scheduled k)
    assert unbiased_topk_TE(p_TE, 2).tolist() == [[False, True, True, False], [True, False, True, False]]
    top1 = [[False, True, False, False], [False, False, True, False]]
    assert unbiased_topk_TE(p_TE, torch.tensor(1)).tolist() == top1
