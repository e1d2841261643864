"""The Triton expert ops (``torch.ops.moespec.triton_expert_ffn[_combine]``) against a per-token
float64 loop: forward and every gradient (x, each weight and bias, the routing weights), fp32
and fp16, odd shapes (T 1/7/64, D 48/100), an expert without rows, all tokens on one expert,
dropped rows, every activation, mlp and glu, with and without bias, the clamped GLU (GPT-OSS's
limit, alpha and up + 1; a limit alone), experts split into groups
(heterogeneous layers call the op once per group). Run under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import moespec.ops.dispatch  # registers sort_by_expert
import moespec.ops.expert_ffn  # noqa: F401
from moespec.ops import _expert_triton

OPS = torch.ops.moespec
FIELDS = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")


def _act(name: str, a: torch.Tensor) -> torch.Tensor:
    f = torch.nn.functional
    return {
        "relu": torch.relu,
        "silu": f.silu,
        "gelu": f.gelu,
        "gelu_tanh": lambda v: f.gelu(v, approximate="tanh"),
    }[name](a)


def _gated(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, or the clamped GLU as GPT-OSS's ``_apply_gate`` writes it."""
    name, *opts = activation.split(";")
    o = {k: float(v) for k, v in (s.split("=") for s in opts)}
    if "limit" in o:
        gate, up = gate.clamp(min=None, max=o["limit"]), up.clamp(min=-o["limit"], max=o["limit"])
    if "up_softcap" in o:  # Inkling-2's softcapped SwiGLU: c tanh(v / c)
        up = torch.tanh(up / o["up_softcap"]) * o["up_softcap"]
    if "gate_softcap" in o:
        lin = torch.tanh(gate / o["gate_softcap"]) * o["gate_softcap"]
        return (up + o.get("up_offset", 0.0)) * lin * torch.sigmoid(gate * o.get("alpha", 1.0))
    a = gate * torch.sigmoid(gate * o["alpha"]) if "alpha" in o else _act(name, gate)
    return (up + o.get("up_offset", 0.0)) * a


def _case(t, d, f, e, k, glu, bias, dtype, *, busy=None, drop=0.0, empty=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if busy is not None:  # every token's first choice is `busy` (choices stay distinct)
        for row in idx_TK:
            j = (row == busy).nonzero()
            if len(j):
                row[j[0, 0]] = row[0].clone()
            row[0] = busy
    if empty is not None:  # expert `empty` gets no rows
        idx_TK[idx_TK == empty] = (empty + 1) % e
        idx_TK = torch.stack([torch.randperm(e, generator=g)[:k] if len(set(r.tolist())) < k else r
                              for r in idx_TK])  # fmt: skip
        idx_TK[idx_TK == empty] = -1
    keep_TK = (torch.rand(t, k, generator=g) >= drop) & (idx_TK >= 0)
    idx_TK = idx_TK.clamp(min=0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype).requires_grad_()  # noqa: E731
    none = torch.empty(0, dtype=dtype)
    p = {
        "w_up": mk(e, f, d), "w_gate": mk(e, f, d) if glu else none, "w_down": mk(e, d, f),
        "b_up": mk(e, f) if bias else none, "b_gate": mk(e, f) if bias and glu else none,
        "b_down": mk(e, d) if bias else none,
    }  # fmt: skip
    x = torch.randn(t, d, generator=g).to(dtype).requires_grad_()
    w_TK = torch.rand(t, k, generator=g).requires_grad_()
    return x, idx_TK, keep_TK, w_TK, p


def _loop(x, idx_TK, keep_TK, w_TK, p, activation):
    """y[t] = sum over kept slots j of w[t, j] FFN_{idx[t, j]}(x[t]), one token at a time."""
    out = []
    has = lambda n: p[n].numel() > 0  # noqa: E731
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(idx_TK.shape[1]):
            if not keep_TK[t, j]:
                continue
            e = int(idx_TK[t, j])
            up = x[t] @ p["w_up"][e].T + (p["b_up"][e] if has("b_up") else 0)
            if has("w_gate"):
                gate = x[t] @ p["w_gate"][e].T + (p["b_gate"][e] if has("b_gate") else 0)
                h = _gated(activation, gate, up)
            else:
                h = _act(activation, up)
            acc = acc + w_TK[t, j] * (h @ p["w_down"][e].T + (p["b_down"][e] if has("b_down") else 0))
        out.append(acc)
    return torch.stack(out)


def _triton(x, idx_TK, keep_TK, w_TK, p, activation, *, combined: bool, groups: int):
    """The experts through the Triton ops, one call per expert group, summed (as the layer
    graph does); without the combine the rows are summed per token here."""
    n_exp = p["w_up"].shape[0]
    tok, slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, n_exp)
    w_N = (w_TK * keep_TK).reshape(-1)[slot]
    cuts = [round(i * n_exp / groups) for i in range(groups + 1)]
    y = 0
    for first, last in itertools.pairwise(cuts):
        q = [p[n][first:last] if p[n].numel() else p[n] for n in FIELDS]
        if combined:
            y = y + OPS.triton_expert_ffn_combine(x, tok, w_N, offs, first, *q, activation)[0]
        else:
            y_ND = OPS.triton_expert_ffn(x, tok, offs, first, *q, activation)[0]
            y = y + torch.zeros_like(x).index_add(0, tok, y_ND * w_N.to(x.dtype).unsqueeze(1))
    return y


def _grads(y, x, w_TK, p):
    tensors = [x, w_TK, *(v for v in p.values() if v.numel())]
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return [g if g is not None else torch.zeros_like(t)
            for g, t in zip(torch.autograd.grad((y * probe).sum(), tensors, allow_unused=True), tensors,
                            strict=True)]  # fmt: skip


def _f64(x, w_TK, p):
    c = lambda v: v.detach().double().requires_grad_()  # noqa: E731
    return c(x), c(w_TK), {n: c(v) for n, v in p.items()}


CASES = [
    # T, D, F, E, K, glu, bias, activation, extra
    (1, 48, 100, 4, 2, True, False, "silu", {}),
    (7, 100, 48, 5, 2, False, True, "gelu", {}),
    (7, 48, 100, 6, 1, True, True, "gelu_tanh", {"drop": 0.3}),
    (64, 48, 40, 8, 2, False, False, "relu", {"busy": 3}),  # all tokens on expert 3
    (64, 100, 48, 8, 3, True, True, "silu", {"empty": 5, "drop": 0.2}),  # expert 5 has no rows
    # The clamped GLU, limits small enough to clamp here
    (7, 48, 40, 5, 2, True, True, "silu;limit=1.0;alpha=1.702;up_offset=1.0", {"drop": 0.2}),
    (64, 48, 40, 6, 2, True, False, "silu;limit=0.8", {"busy": 2}),
    (7, 100, 48, 5, 2, True, True, "silu;limit=1.2;gate_softcap=0.8;up_softcap=1.5", {}),
]


@pytest.mark.parametrize("combined", [True, False], ids=["combine", "rows"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-E{c[3]}-k{c[4]}-{c[7]}")
def test_fp32_forward_and_every_gradient(case, combined):
    t, d, f, e, k, glu, bias, activation, extra = case
    x, idx, keep, w_TK, p = _case(t, d, f, e, k, glu, bias, torch.float32, **extra)
    before = sum(_expert_triton.LAUNCHES.values())
    groups = 2 if e > 4 else 1
    y = _triton(x, idx, keep, w_TK, p, activation, combined=combined, groups=groups)
    got = _grads(y, x, w_TK, p)
    assert sum(_expert_triton.LAUNCHES.values()) > before  # the Triton kernels ran
    x64, w64, p64 = _f64(x, w_TK, p)
    ref = _loop(x64, idx, keep, w64, p64, activation)
    want = _grads(ref, x64, w64, p64)
    torch.testing.assert_close(y, ref.float(), atol=1e-5, rtol=1e-4)
    names = ["x", "w_TK", *(n for n, v in p.items() if v.numel())]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["glu-silu", "glu-bias-empty"])
def test_fp16(case):
    t, d, f, e, k, glu, bias, activation, extra = case
    x, idx, keep, w_TK, p = _case(t, d, f, e, k, glu, bias, torch.float16, **extra)
    y = _triton(x, idx, keep, w_TK, p, activation, combined=True, groups=1)
    got = _grads(y, x, w_TK, p)
    x64, w64, p64 = _f64(x, w_TK, p)
    ref = _loop(x64, idx, keep, w64, p64, activation)
    want = _grads(ref, x64, w64, p64)
    assert y.dtype == torch.float16
    rel = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
    assert rel(y, ref) < 5e-3
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-2


def test_deterministic():
    x, idx, keep, w_TK, p = _case(64, 48, 40, 8, 2, True, True, torch.float32, busy=1)
    runs = []
    for _ in range(2):
        y = _triton(x, idx, keep, w_TK, p, "silu", combined=True, groups=1)
        runs.append([y, *_grads(y, x, w_TK, p)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_opcheck():
    x, idx, keep, w_TK, p = _case(7, 48, 40, 4, 2, True, True, torch.float32)
    tok, slot, offs = OPS.sort_by_expert(idx, keep, 4)
    w_N = (w_TK * keep).reshape(-1)[slot].detach().requires_grad_()
    q = [p[n] for n in FIELDS]
    torch.library.opcheck(OPS.triton_expert_ffn.default, (x, tok, offs, 0, *q, "silu"))
    torch.library.opcheck(OPS.triton_expert_ffn_combine.default, (x, tok, w_N, offs, 0, *q, "silu"))


def test_strided_inputs_are_read_as_values():
    """A column slice of a wider tensor (what a layer gets from x[..., :d]) gives the same
    results as its contiguous copy: the kernels index rows densely, so the op packs them."""
    x, idx, keep, w_TK, p = _case(7, 48, 40, 4, 2, True, False, torch.float32)
    wide = torch.randn(7, 96)
    wide[:, :48] = x.detach()
    strided = wide[:, :48]
    assert not strided.is_contiguous()
    with torch.no_grad():
        got = _triton(strided, idx, keep, w_TK, p, "silu", combined=True, groups=1)
        want = _triton(strided.contiguous(), idx, keep, w_TK, p, "silu", combined=True, groups=1)
    assert torch.equal(got, want)
