"""Reference top-k router: invariants, hand-computed cases, group limits, expert bias,
GShard second-expert policies, noise/jitter and the sorted representation.

Shape legend: T tokens, D d_model, E experts, K top-k, G groups.
"""

from __future__ import annotations

import math

import pytest
import torch

from moespec.reference import route_topk, update_expert_bias
from moespec.spec.routers import TopKRouter


def router(**kw: object) -> TopKRouter:
    return TopKRouter.model_validate({"kind": "topk", "k": 2, **kw})


def rand(t: int, d: int, e: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, d, generator=g), torch.randn(e, d, generator=g) * scale / math.sqrt(d)


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("d", [48, 100])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_softmax_then_topk_renorm_equals_topk_then_softmax(t: int, d: int, k: int) -> None:
    x_TD, w_ED = rand(t, d, 8, seed=t + d + k)
    a = route_topk(x_TD, w_ED, router(k=k, renormalize=True), n_experts=8, training=False)
    b = route_topk(x_TD, w_ED, router(k=k, order="topk_then_softmax"), n_experts=8, training=False)
    assert torch.equal(a.topk_idx_TK, b.topk_idx_TK)
    torch.testing.assert_close(a.topk_weight_TK, b.topk_weight_TK)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_renormalized_weights_sum_to_scaling_factor(score: str, scale: float) -> None:
    x_TD, w_ED = rand(64, 48, 8)
    r = route_topk(
        x_TD,
        w_ED,
        router(k=3, score=score, renormalize=True, scaling_factor=scale),
        n_experts=8,
        training=False,
    )
    torch.testing.assert_close(r.topk_weight_TK.sum(-1), torch.full((64,), scale))


def test_scaling_factor_and_temperature_by_hand() -> None:
    # E=3, D=2: logits = x W^T = [2, 0, -2] for x=[1, 0]; temperature 2 -> [1, 0, -1].
    x_TD = torch.tensor([[1.0, 0.0]])
    w_ED = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-2.0, 1.0]])
    r = route_topk(x_TD, w_ED, router(temperature=2.0, scaling_factor=3.0), n_experts=3, training=False)
    torch.testing.assert_close(r.logits_TE, torch.tensor([[1.0, 0.0, -1.0]]))
    z = math.e + 1 + math.exp(-1)
    assert r.topk_idx_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(r.topk_weight_TK, torch.tensor([[3 * math.e / z, 3 / z]]))
    # sigmoid scores: weights are the selected sigmoids, not renormalised by default
    s = route_topk(x_TD, w_ED, router(score="sigmoid", temperature=2.0), n_experts=3, training=False)
    torch.testing.assert_close(s.topk_weight_TK, torch.sigmoid(torch.tensor([[1.0, 0.0]])))


def test_router_bias_is_added_before_temperature() -> None:
    x_TD, w_ED = rand(7, 48, 4)
    b_E = torch.tensor([0.5, -1.0, 2.0, 0.0])
    r = route_topk(x_TD, w_ED, router(bias=True, temperature=0.5), n_experts=4, training=False, bias_E=b_E)
    torch.testing.assert_close(r.logits_TE, (x_TD @ w_ED.T + b_E) / 0.5)


def test_ties_go_to_the_lower_expert_index() -> None:
    r = route_topk(torch.ones(3, 4), torch.zeros(6, 4), router(k=3), n_experts=6, training=False)
    assert r.topk_idx_TK.tolist() == [[0, 1, 2]] * 3


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_never_picks_outside_kept_groups(group_score: str, score: str) -> None:
    x_TD, w_ED = rand(64, 48, 12, scale=3.0)
    spec = router(k=3, score=score, groups={"n_groups": 4, "topk_groups": 2, "group_score": group_score})
    r = route_topk(x_TD, w_ED, spec, n_experts=12, training=False)
    for t in range(64):
        s = r.probs_TE[t].view(4, 3)
        best = s.sort(-1, descending=True).values
        gscore = best[:, 0] + best[:, 1] if group_score == "top2_sum" else best[:, 0]
        kept = set(gscore.argsort(descending=True)[:2].tolist())
        chosen = r.topk_idx_TK[t].tolist()
        assert {e // 3 for e in chosen} <= kept
        # and within the kept groups they are the best 3 experts
        allowed = [e for e in range(12) if e // 3 in kept]
        expect = sorted(allowed, key=lambda e: -r.probs_TE[t, e].item())[:3]
        assert chosen == expect


def test_group_mask_is_minus_inf_not_zero() -> None:
    # Sigmoid scores + a negative expert bias: every biased score is < 0. HF's old 0.0 fill
    # would let a masked expert (score 0) beat every kept one; -inf never does.
    x_TD, w_ED = rand(64, 48, 8, scale=2.0)
    spec = router(k=2, score="sigmoid", groups={"n_groups": 4, "topk_groups": 1}, expert_bias={})
    bias_E = torch.full((8,), -2.0)
    r = route_topk(x_TD, w_ED, spec, n_experts=8, training=False, expert_bias_E=bias_E)
    groups = r.topk_idx_TK // 2
    assert torch.equal(groups[:, 0], groups[:, 1])  # both from the single kept group


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_expert_bias_changes_selection_not_weights(score: str) -> None:
    x_TD, w_ED = rand(64, 48, 8)
    spec = router(k=2, score=score, expert_bias={})
    plain = route_topk(x_TD, w_ED, spec, n_experts=8, training=False, expert_bias_E=torch.zeros(8))
    bias_E = torch.zeros(8)
    bias_E[5] = 10.0  # forces expert 5 into every token's top-2
    r = route_topk(x_TD, w_ED, spec, n_experts=8, training=False, expert_bias_E=bias_E)
    assert (r.topk_idx_TK == 5).any(-1).all()
    assert not torch.equal(r.topk_idx_TK, plain.topk_idx_TK)
    # weights are the unbiased scores of the chosen experts
    torch.testing.assert_close(r.topk_weight_TK, r.probs_TE.gather(1, r.topk_idx_TK))
    torch.testing.assert_close(r.probs_TE, plain.probs_TE)


def test_update_expert_bias_sign() -> None:
    bias_E = torch.zeros(4)
    new = update_expert_bias(bias_E, torch.tensor([10, 0, 5, 5]), rate=0.1)
    torch.testing.assert_close(new, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert torch.equal(bias_E, torch.zeros(4))  # pure: the input is untouched


@pytest.mark.parametrize("renormalize", [False, True])
def test_second_expert_random_keeps_with_prob_2g2(renormalize: bool) -> None:
    t = 4000
    x_TD, w_ED = rand(t, 48, 4, seed=3, scale=2.0)
    spec = router(second_expert_policy="random", renormalize=renormalize)
    r = route_topk(x_TD, w_ED, spec, n_experts=4, training=True, generator=torch.Generator().manual_seed(0))
    assert r.active_TK[:, 0].all()
    p_T = (2 * r.topk_weight_TK[:, 1]).clamp(max=1.0)
    expected, sd = p_T.sum().item(), (p_T * (1 - p_T)).sum().sqrt().item()
    kept = r.active_TK[:, 1].sum().item()
    assert abs(kept - expected) < 4 * sd
    # the kept decision follows the probability: tokens with small g2 are kept less often
    lo = p_T < p_T.median()
    assert r.active_TK[lo, 1].float().mean() < r.active_TK[~lo, 1].float().mean()
    # the selection itself is the plain top-2, and dropped slots do not reach the rows
    assert r.to_sorted().token_idx_N.numel() == t + kept


def test_second_expert_sampling_draws_from_softmax_without_first() -> None:
    t = 6000
    x_TD = torch.ones(t, 4)
    w_ED = torch.tensor([[1.0] * 4, [0.5] * 4, [0.25] * 4, [0.0] * 4])  # same token repeated
    spec = router(second_expert_policy="sampling")
    r = route_topk(x_TD, w_ED, spec, n_experts=4, training=True, generator=torch.Generator().manual_seed(0))
    assert (r.topk_idx_TK[:, 0] == 0).all() and (r.topk_idx_TK[:, 1] != 0).all()
    p = r.probs_TE[0, 1:] / r.probs_TE[0, 1:].sum()
    freq = torch.bincount(r.topk_idx_TK[:, 1], minlength=4)[1:].float() / t
    sd = (p * (1 - p) / t).sqrt()
    assert ((freq - p).abs() < 4 * sd).all()
    torch.testing.assert_close(r.topk_weight_TK, r.probs_TE.gather(1, r.topk_idx_TK))


def test_randomness_needs_a_generator() -> None:
    x_TD, w_ED = rand(7, 48, 4)
    with pytest.raises(ValueError, match="Generator"):
        route_topk(x_TD, w_ED, router(noise={"kind": "fixed", "std": 1.0}), n_experts=4, training=True)
    # eval mode draws nothing, so no generator is needed
    route_topk(x_TD, w_ED, router(noise={"kind": "fixed", "std": 1.0}), n_experts=4, training=False)


def test_learned_noise_formula() -> None:
    x_TD, w_ED = rand(7, 48, 4)
    wn_ED = torch.randn(4, 48) * 0.1
    spec = router(noise={"kind": "learned", "epsilon": 0.01})
    r = route_topk(
        x_TD,
        w_ED,
        spec,
        n_experts=4,
        training=True,
        generator=torch.Generator().manual_seed(5),
        noise_w_ED=wn_ED,
    )
    eps_TE = torch.randn(7, 4, generator=torch.Generator().manual_seed(5))
    std_TE = torch.nn.functional.softplus(x_TD @ wn_ED.T) + 0.01
    torch.testing.assert_close(r.noise_std_TE, std_TE)
    torch.testing.assert_close(r.noisy_logits_TE, x_TD @ w_ED.T + eps_TE * std_TE)
    torch.testing.assert_close(r.logits_TE, x_TD @ w_ED.T)
    ev = route_topk(x_TD, w_ED, spec, n_experts=4, training=False, noise_w_ED=wn_ED)
    assert ev.noise_std_TE is None and torch.equal(ev.noisy_logits_TE, ev.logits_TE)


def test_jitter_multiplies_router_input() -> None:
    x_TD, w_ED = rand(7, 48, 4)
    r = route_topk(
        x_TD, w_ED, router(jitter=0.1), n_experts=4, training=True, generator=torch.Generator().manual_seed(2)
    )
    u_TD = torch.rand(7, 48, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(r.logits_TE, (x_TD * (0.9 + 0.2 * u_TD)) @ w_ED.T)
    ev = route_topk(x_TD, w_ED, router(jitter=0.1), n_experts=4, training=False)
    torch.testing.assert_close(ev.logits_TE, x_TD @ w_ED.T)


def test_router_dtype() -> None:
    x_TD, w_ED = rand(7, 48, 4)
    r = route_topk(x_TD, w_ED, router(dtype="bf16"), n_experts=4, training=False)
    assert r.logits_TE.dtype == r.topk_weight_TK.dtype == torch.bfloat16
    r = route_topk(x_TD, w_ED, router(), n_experts=4, training=False, default_dtype="fp64")
    assert r.logits_TE.dtype == torch.float64


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_sorted_representation_invariants(t: int, k: int) -> None:
    x_TD, w_ED = rand(t, 100, 6, seed=t * k)
    r = route_topk(x_TD, w_ED, router(k=k), n_experts=6, training=False)
    keep_TK = torch.rand(t, k, generator=torch.Generator().manual_seed(0)) > 0.3
    s = r.to_sorted(keep_TK)
    counts = torch.bincount(s.expert_idx_N, minlength=6)
    assert torch.equal(s.offsets_E1, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(s.counts_E, r.tokens_per_expert(keep_TK))
    assert s.token_idx_N.numel() == t * k - int((~keep_TK).sum())
    assert torch.equal(s.expert_idx_N, s.expert_idx_N.sort().values)
    for e in range(6):
        toks = s.token_idx_N[s.offsets_E1[e] : s.offsets_E1[e + 1]]
        assert torch.equal(toks, toks.sort().values) and toks.unique().numel() == toks.numel()
    # every row is one kept (token, k) slot with its weight
    assert torch.equal(r.topk_idx_TK[s.token_idx_N, s.slot_N], s.expert_idx_N)
    assert keep_TK[s.token_idx_N, s.slot_N].all()
    torch.testing.assert_close(r.topk_weight_TK[s.token_idx_N, s.slot_N], s.weight_N)
    p = s.padded(t * k)
    n = s.token_idx_N.numel()
    assert p.token_idx_N.numel() == t * k and (p.expert_idx_N[n:] == 6).all() and (p.weight_N[n:] == 0).all()


def test_all_tokens_forced_onto_one_expert() -> None:
    x_TD, w_ED = rand(64, 48, 8)
    b_E = torch.zeros(8)
    b_E[3] = 1e4
    r = route_topk(x_TD, w_ED, router(k=1, bias=True), n_experts=8, training=False, bias_E=b_E)
    s = r.to_sorted()
    assert (r.topk_idx_TK == 3).all()
    assert s.counts_E.tolist() == [0, 0, 0, 64, 0, 0, 0, 0]
    assert torch.equal(s.token_idx_N, torch.arange(64))
