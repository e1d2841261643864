"""The reference layer against a naive per-token loop (dumb_forward), forward and every
gradient, plus determinism, NaN inputs, empty experts and all tokens on one expert.

dumb_forward shares nothing with the reference but the spec models: it routes each token
with Python sorting, fills capacity with per-expert counters, and runs experts as
matrix-vector products with torch.nn.functional activations.

Shape legend: T tokens, D d_model, E experts, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moespec.reference import BUFFERS, init_reference_params, moe_layer_reference
from moespec.spec.experts import FFNSpec
from moespec.spec.schema import LayerSpec

ACT: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
}


def dumb_ffn(v_D: Tensor, params: dict[str, Tensor], prefix: str, i: int, spec: FFNSpec) -> Tensor:
    def lin(name: str, bias: str, inp: Tensor) -> Tensor:
        out = params[f"{prefix}.{name}"][i] @ inp
        return out + params[f"{prefix}.{bias}"][i] if spec.bias else out

    up = lin("w_up", "b_up", v_D)
    h = (
        ACT[spec.activation](lin("w_gate", "b_gate", v_D)) * up
        if spec.kind == "glu"
        else ACT[spec.activation](up)
    )
    return lin("w_down", "b_down", h)


def dumb_experts(params: dict[str, Tensor], layer: LayerSpec) -> list[Callable[[Tensor], Tensor]]:
    fns: list[Callable[[Tensor], Tensor]] = []
    for g, grp in enumerate(layer.experts.routed):
        for i in range(grp.n_experts):
            fns.append(lambda v, g=g, i=i, grp=grp: dumb_ffn(v, params, f"experts.{g}", i, grp))
    for z, zc in enumerate(layer.experts.zero_compute):
        for i in range(zc.count):
            if zc.kind == "zero":
                fns.append(lambda v: v * 0.0)
            elif zc.kind == "copy":
                fns.append(lambda v: v)
            else:

                def const(v: Tensor, z: int = z, i: int = i) -> Tensor:
                    w, vec = params[f"zero_compute.{z}.w_c"][i], params[f"zero_compute.{z}.v"][i]
                    e0, e1 = torch.exp(w[0] @ v), torch.exp(w[1] @ v)
                    return e0 / (e0 + e1) * v + e1 / (e0 + e1) * vec

                fns.append(const)
    return fns


def dumb_forward(x_TD: Tensor, params: dict[str, Tensor], layer: LayerSpec) -> tuple[Tensor, Tensor]:
    """Eval-mode layer, one token at a time. Returns (y_TD, aux_loss) (batch-scope losses)."""
    r, ex = layer.router, layer.experts
    n, k, t_count = ex.n_routed, r.k, x_TD.shape[0]
    fns = dumb_experts(params, layer)
    slots: dict[tuple[int, int], tuple[int, Tensor]] = {}  # (t, j) -> (expert, weight)
    probs, logits = [], []
    for t in range(t_count):
        z = params["router.weight"] @ x_TD[t]
        if r.bias:
            z = z + params["router.bias"]
        z = z / r.temperature
        if r.score == "softmax":
            p = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        else:
            p = 1.0 / (1.0 + torch.exp(-z))
        crit = (z if r.order == "topk_then_softmax" else p).tolist()
        if r.expert_bias is not None:
            crit = [c + b for c, b in zip(crit, params["router.expert_bias"].tolist(), strict=True)]
        if r.groups is not None:
            size = n // r.groups.n_groups
            gs = []
            for g in range(r.groups.n_groups):
                vals = sorted(crit[g * size : (g + 1) * size], reverse=True)
                gs.append(vals[0] + vals[1] if r.groups.group_score == "top2_sum" else vals[0])
            kept = sorted(range(len(gs)), key=lambda g: (-gs[g], g))[: r.groups.topk_groups]
            crit = [c if e // size in kept else -math.inf for e, c in enumerate(crit)]
        chosen = sorted(range(n), key=lambda e: (-crit[e], e))[:k]
        if r.order == "topk_then_softmax":
            ez = torch.stack([torch.exp(z[e] - z[chosen[0]]) for e in chosen])
            w = ez / ez.sum()
        else:
            w = torch.stack([p[e] for e in chosen])
            if r.renormalize:
                w = w / w.sum()
        for j, e in enumerate(chosen):
            slots[t, j] = (e, w[j] * r.scaling_factor)
        probs.append(p if r.score == "softmax" else p / p.sum())
        logits.append(z)

    keep = dict.fromkeys(slots, True)
    cap = layer.capacity
    if cap.kind == "factor":
        c = max(math.ceil(cap.eval_factor * t_count * k / n), cap.min_capacity)
        order = [(t, j) for j in range(k) for t in range(t_count)]
        if cap.drop_policy == "score":
            order = sorted(order, key=lambda s: -slots[s][1].item())  # stable: position on ties
        if cap.drop_policy == "batch_priority":
            top = {t: max(slots[t, j][1].item() for j in range(k)) for t in range(t_count)}
            tokens = sorted(range(t_count), key=lambda t: -top[t])  # stable: position on ties
            order = [(t, j) for j in range(k) for t in tokens]
        used = [0] * n
        for s in order:
            e = slots[s][0]
            keep[s] = used[e] < c
            used[e] += keep[s]

    ys = []
    for t in range(t_count):
        acc = torch.zeros_like(x_TD[t])
        for j in range(k):
            e, w = slots[t, j]
            if keep[t, j]:
                acc = acc + w * fns[e](x_TD[t])
        if ex.shared is not None:
            sh = sum(dumb_ffn(x_TD[t], params, "shared", s, ex.shared) for s in range(ex.shared.count))
            if ex.shared.gate:
                sh = torch.sigmoid(params["shared.gate"] @ x_TD[t]) * sh
            acc = acc + sh
        ys.append(acc)

    aux = torch.zeros((), dtype=x_TD.dtype)
    lb = layer.losses.load_balance
    p_TE = torch.stack(probs)
    if lb is not None and lb.kind == "switch":
        f = [sum(1 for s, (e, _) in slots.items() if e == i) / (t_count * k) for i in range(n)]
        aux = aux + lb.weight * n * sum(f[i] * p_TE[:, i].mean() for i in range(n))
    if lb is not None and lb.kind == "gshard":
        ce = [sum(1 for t in range(t_count) if slots[t, 0][0] == i) / t_count for i in range(n)]
        aux = aux + lb.weight * n * n * sum(ce[i] * p_TE[:, i].mean() for i in range(n)) / n
    if layer.losses.z_loss is not None:
        lse = [torch.log(torch.exp(z).sum()) ** 2 for z in logits]
        aux = aux + layer.losses.z_loss.weight * sum(lse) / t_count
    return torch.stack(ys), aux


CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {
        "router": {"renormalize": True},
        "losses": {"load_balance": {"kind": "switch", "weight": 0.01}, "z_loss": {"weight": 1e-3}},
    },
    "switch_mlp_bias_capacity": {
        "routed": [{"kind": "mlp", "activation": "relu", "d_ff": 24, "count": 6, "bias": True}],
        "router": {"k": 1, "bias": True, "temperature": 0.7},
        "capacity": {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0, "min_capacity": 0},
        "losses": {"load_balance": {"kind": "gshard", "weight": 0.01}},
    },
    "vmoe_batch_priority": {
        "router": {"k": 2},
        "capacity": {
            "kind": "factor",
            "train_factor": 0.6,
            "eval_factor": 0.6,
            "drop_policy": "batch_priority",
        },
    },
    "deepseek_v3": {
        "routed": [{"kind": "glu", "activation": "silu", "d_ff": 32, "count": 4, "granularity": 2}],
        "shared": {"kind": "glu", "activation": "silu", "d_ff": 16, "count": 2, "gate": True},
        "router": {
            "k": 3,
            "score": "sigmoid",
            "renormalize": True,
            "scaling_factor": 2.5,
            "groups": {"n_groups": 4, "topk_groups": 2},
            "expert_bias": {},
        },
        "capacity": {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.5, "drop_policy": "score"},
        "losses": {"load_balance": {"kind": "switch", "weight": 0.001}},
    },
    "moepp_heterogeneous": {
        "routed": [
            {"kind": "glu", "activation": "gelu", "d_ff": 32, "count": 3},
            {"kind": "mlp", "activation": "gelu_tanh", "d_ff": 24, "count": 2, "bias": True},
        ],
        "zero_compute": [{"kind": "zero"}, {"kind": "copy"}, {"kind": "constant", "count": 2}],
        "shared": {"kind": "mlp", "activation": "relu", "d_ff": 16, "bias": True},
        "router": {
            "order": "topk_then_softmax",
            "groups": {"n_groups": 3, "topk_groups": 2, "group_score": "max"},
        },
        "capacity": {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0, "min_capacity": 1},
        "losses": {"z_loss": {"weight": 1e-2}},
    },
}


def make_params(layer: LayerSpec, d: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """Random params, scaled up so routing is far from uniform and outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)
    params = init_reference_params(layer, d, generator=g, dtype=torch.float64)
    for name, t in params.items():
        t.normal_(0.0, 1.0 / math.sqrt(t.shape[-1]), generator=g)
        if name == "router.expert_bias":
            t.mul_(0.3)
    return {n: t.to(dtype).requires_grad_(n not in BUFFERS) for n, t in params.items()}


def grads(y: Tensor, aux: Tensor, x: Tensor, params: dict[str, Tensor], r_TD: Tensor) -> dict[str, Tensor]:
    leaves = {"x": x} | {n: p for n, p in params.items() if p.requires_grad}
    out = torch.autograd.grad((y * r_TD).sum() + aux, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), out, strict=True)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("t", "d"), [(1, 48), (7, 100), (64, 48)])
def test_layer_matches_dumb_forward(name: str, t: int, d: int, make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(**CONFIGS[name])
    params = make_params(layer, d, torch.float64, seed=t)
    x = torch.randn(
        t, d, generator=torch.Generator().manual_seed(t + 1), dtype=torch.float64, requires_grad=True
    )
    r_TD = torch.randn(t, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    y, aux, stats = moe_layer_reference(x, params, layer, d, training=False, router_dtype="fp64")
    y_ref, aux_ref = dumb_forward(x, params, layer)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux, aux_ref)
    got, want = grads(y, aux, x, params, r_TD), grads(y_ref, aux_ref, x, params, r_TD)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=lambda m, n=n: f"grad of {n}: {m}")
    assert int(stats.tokens_per_expert.sum()) == t * layer.router.k - stats.capacity.n_dropped


def test_fp32_layer_matches_fp64_dumb_forward(make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(**CONFIGS["deepseek_v3"])
    params64 = make_params(layer, 48, torch.float64)
    params32 = {n: p.detach().float().requires_grad_(p.requires_grad) for n, p in params64.items()}
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    y, aux, _ = moe_layer_reference(x, params32, layer, 48, training=False)
    assert y.dtype == torch.float32
    y_ref, aux_ref = dumb_forward(x.double(), params64, layer)
    torch.testing.assert_close(y, y_ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux, aux_ref.float(), atol=1e-6, rtol=1e-4)


RANDOM_LAYER: dict[str, Any] = {
    "router": {"second_expert_policy": "random", "noise": {"kind": "learned"}},
    "capacity": {"kind": "factor", "train_factor": 0.75, "eval_factor": 2.0, "drop_policy": "random"},
    "losses": {"load_balance": {"kind": "importance_load_cv2", "importance_weight": 0.1, "load_weight": 0.1}},
}


def test_determinism_with_seeded_generator(make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(**RANDOM_LAYER)
    params = make_params(layer, 48, torch.float32)
    x = torch.randn(2, 32, 48, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        y, aux, st = moe_layer_reference(x, params, layer, 48, training=True, generator=g)
        return y, aux, st.capacity.keep_TK

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_nan_input_propagates_without_crashing(make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(**CONFIGS["deepseek_v3"])
    params = make_params(layer, 48, torch.float32)
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(0))
    x[3, 5] = float("nan")
    y, aux, stats = moe_layer_reference(x, params, layer, 48, training=False)
    assert torch.isnan(y[3]).all()
    assert torch.isnan(aux)
    assert stats.tokens_per_expert.numel() == 8
    # random layer in training mode too
    layer = make_layer(**RANDOM_LAYER)
    params = make_params(layer, 48, torch.float32)
    y, _, _ = moe_layer_reference(
        x, params, layer, 48, training=True, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isnan(y[3]).any()


def test_all_tokens_on_one_expert_and_empty_experts(make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(
        router={"k": 1, "bias": True},
        capacity={"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0, "min_capacity": 3},
    )
    params = make_params(layer, 48, torch.float32)
    with torch.no_grad():
        params["router.bias"][:] = 0.0
        params["router.bias"][2] = 1e4
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(0))
    y, _, stats = moe_layer_reference(x, params, layer, 48, training=False)
    assert stats.routed_per_expert.tolist() == [7 if e == 2 else 0 for e in range(8)]
    assert stats.tokens_per_expert.tolist() == [3 if e == 2 else 0 for e in range(8)]  # C = max(1, 3)
    assert stats.load_ratio == math.inf and stats.router_entropy < 1e-6
    assert stats.dropped_fraction == pytest.approx(4 / 7)
    assert (y[3:] == 0).all() and (y[:3] != 0).any()  # the first C tokens only
    y.sum().backward()
    g = params["experts.0.w_up"].grad
    assert g is not None and g[2].abs().sum() > 0
    assert (g[torch.arange(8) != 2] == 0).all()  # experts without tokens: zero gradient


def test_batched_input_and_sequence_scope(make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(losses={"load_balance": {"kind": "switch", "weight": 1.0, "scope": "sequence"}})
    params = make_params(layer, 48, torch.float32)
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0))
    y3, aux3, _ = moe_layer_reference(x, params, layer, 48, training=False)
    y2, aux2, _ = moe_layer_reference(x.reshape(15, 48), params, layer, 48, training=False)
    assert y3.shape == x.shape
    torch.testing.assert_close(y3.reshape(15, 48), y2)
    per_seq = [moe_layer_reference(x[b], params, layer, 48, training=False)[1] for b in range(3)]
    torch.testing.assert_close(aux3, torch.stack(per_seq).mean())
    assert not torch.allclose(aux3, aux2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_empty_batch(name: str, make_layer: Callable[..., LayerSpec]) -> None:
    layer = make_layer(**CONFIGS[name])
    params = make_params(layer, 48, torch.float32)
    y, aux, stats = moe_layer_reference(torch.zeros(0, 48), params, layer, 48, training=False)
    assert y.shape == (0, 48) and aux.item() == 0.0
    assert stats.tokens_per_expert.sum() == 0 and stats.sorted.offsets_E1[-1] == 0
