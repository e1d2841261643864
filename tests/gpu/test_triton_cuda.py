"""``target.backend: triton`` on a CUDA GPU (skipped without one): the generated kernels
against the torch backend's grouped kernels on the same GPU (fp32 exact dots, every gradient;
bf16 within its rounding), odd shapes (T 1/7/64, D 48/100: 100 breaks 16-byte alignment), an
expert without rows, all tokens on one expert; a triton layer against a torch-backend layer;
determinism; torch.compile(fullgraph=True)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import moespec
import moespec.ops.dispatch  # registers sort_by_expert
from moespec.ops import _expert_grouped, _expert_triton
from moespec.ops._expert_weights import ExpertWeights

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA device and triton",
)
OPS = torch.ops.moespec
SPECS = Path(__file__).resolve().parents[2] / "specs"
CASES = [
    # T, D, F, E, K, glu, bias, activation, busy, empty
    (1, 48, 100, 4, 2, True, False, "silu", None, None),
    (7, 100, 48, 5, 2, False, True, "gelu", None, None),
    (64, 48, 40, 8, 2, False, False, "relu", 3, None),
    (64, 100, 48, 8, 3, True, True, "gelu_tanh", None, 5),
    (512, 256, 384, 16, 4, True, False, "silu", None, 2),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _setup(t, d, f, e, k, glu, bias, busy, empty, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if busy is not None:
        idx_TK[:, 0] = busy
    keep_TK = torch.rand(t, k, generator=g) >= 0.1
    if busy is not None:  # duplicates of `busy` dropped
        keep_TK[:, 1:] &= idx_TK[:, 1:] != busy
    if empty is not None:
        keep_TK &= idx_TK != empty
    dev = "cuda"
    tok, slot, offs = OPS.sort_by_expert(idx_TK.to(dev), keep_TK.to(dev), e)
    w_N = torch.rand(t * k, generator=g).to(dev)[slot]
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dev, dtype)  # noqa: E731
    none = torch.empty(0, dtype=dtype, device=dev)
    w = ExpertWeights(mk(e, f, d), mk(e, f, d) if glu else none, mk(e, d, f),
                      mk(e, f) if bias else none, mk(e, f) if bias and glu else none,
                      mk(e, d) if bias else none)  # fmt: skip
    return mk(t, d), tok, offs, w_N, w


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("combine", [True, False], ids=["combine", "rows"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-E{c[3]}-{c[7]}")
def test_kernels_equal_the_torch_kernels(case, combine, dtype):
    t, d, f, e, k, glu, bias, act, busy, empty = case
    x, tok, offs, w_N, w = _setup(t, d, f, e, k, glu, bias, busy, empty, dtype)
    wt = w_N if combine else None
    before = sum(_expert_triton.LAUNCHES.values())
    got = _expert_triton.forward(x, tok, offs, 0, w, act, wt)
    # The reference runs in fp32 whatever the dtype (the torch kernels, no tf32).
    w32 = ExpertWeights(*(v.float() for v in w))
    ref = _expert_grouped.forward(x.float(), tok, offs, 0, w32, act, wt)
    gy = torch.randn_like(ref[0])
    g_got = _expert_triton.backward(gy.to(dtype), x, tok, offs, 0, w, got[1], got[2], bias, act, wt)
    g_ref = _expert_grouped.backward(gy, x.float(), tok, offs, 0, w32, ref[1], ref[2], bias, act, wt)
    torch.cuda.synchronize()
    assert sum(_expert_triton.LAUNCHES.values()) > before
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _rel(got[0], ref[0]) < tol
    pairs = [("x", g_got.x_TD, g_ref.x_TD), *zip(ExpertWeights._fields, g_got.w, g_ref.w, strict=True)]
    if combine:
        pairs.append(("weight_N", g_got.weight_N, g_ref.weight_N))
    for name, a, b in pairs:
        if b.numel():
            assert torch.isfinite(a).all(), name
            assert _rel(a, b) < tol * (3 if name == "weight_N" else 1), (name, _rel(a, b))


def test_deterministic():
    x, tok, offs, w_N, w = _setup(512, 256, 384, 16, 4, True, True, 1, None, torch.bfloat16)
    runs = []
    for _ in range(2):
        y, up, gate = _expert_triton.forward(x, tok, offs, 0, w, "silu", w_N)
        gr = _expert_triton.backward(torch.ones_like(y), x, tok, offs, 0, w, up, gate, True, "silu", w_N)
        runs.append([y, gr.x_TD, *gr.w, gr.weight_N])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _layers(dtype: str):
    spec = str(SPECS / "mixtral-8x7b.yaml")
    ov = ("d_model=128", "layer.experts.routed.0.d_ff=200", f"target.dtype={dtype}", "target.device=cuda")
    tri = moespec.build(spec, (*ov, "target.backend=triton"), seed=2, layer="layer")
    ref = moespec.build(spec, ov, seed=2, layer="layer")
    return tri, ref


def test_layer_equals_torch_backend():
    tri, ref = _layers("fp32")
    x = torch.randn(4, 33, 128, device="cuda")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = tri(x1), ref(x2)
    assert _rel(y1, y2) < 1e-5 and _rel(tri.aux_loss, ref.aux_loss) < 1e-6
    (y1.square().sum() + tri.aux_loss).backward()
    (y2.square().sum() + ref.aux_loss).backward()
    assert _rel(x1.grad, x2.grad) < 1e-5
    for (n, p), (_, q) in zip(tri.named_parameters(), ref.named_parameters(), strict=True):
        assert _rel(p.grad, q.grad) < 1e-5, n


def test_compile_fullgraph():
    tri, _ = _layers("bf16")
    x = torch.randn(2, 16, 128, device="cuda", dtype=torch.bfloat16)
    eager = tri(x)
    compiled = torch.compile(tri, fullgraph=True)
    out = compiled(x)
    out.float().square().sum().backward()
    assert _rel(out, eager) < 1e-2


def test_layer_step_never_waits_on_the_gpu():
    """A training step of a triton layer (router, aux loss, experts, backward) launches all its
    work without a host sync, so the host can run ahead of the GPU (a sync there cost the
    H200 bench ~2 ms a step)."""
    tri, _ = _layers("bf16")
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (tri(x).float().square().mean() + tri.aux_loss).backward()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (tri(x).float().square().mean() + tri.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
