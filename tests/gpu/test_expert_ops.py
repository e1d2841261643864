"""The expert ops and grouped GEMMs on the device, against a plain per-expert loop in fp64.

``expert_ffn`` and ``expert_ffn_combine`` (forward and every gradient) with an expert without
rows, all rows on one expert and dropped rows; one whole-layer group (the grouped kernels'
sync-free path) or two groups (each reads its row range); fp32 and bf16; widths 48 and 100
(a bf16 row of 100 is 200 bytes: grouped_mm's 16-byte alignment fails and the per-expert mm
loop runs instead; 48 takes torch's grouped_mm). ``torch.library.opcheck`` on the expert and
routing ops with device inputs, the routing ops against the CPU on tied scores, and
``gemm.gmm`` / ``gemm.gmm_wgrad`` directly (empty groups, rows past the last offset poisoned).
"""

from __future__ import annotations

import pytest
import torch

import moespec.ops  # noqa: F401  (registers torch.ops.moespec.*)
from moespec.ops import gemm
from moespec.ops.activations import act

OPS = torch.ops.moespec


def _routing(t: int, k: int, e: int, scenario: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU ``(idx_TK, keep_TK)``: "empty" leaves the last expert without rows, "busy" puts
    every row on expert 1 (k=1), "drop" also drops about 30% of the rows."""
    g = torch.Generator().manual_seed(seed)
    if scenario == "busy":
        assert k == 1
        return torch.ones(t, 1, dtype=torch.int64), torch.ones(t, 1, dtype=torch.bool)
    idx_TK = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(t)])
    keep_TK = torch.rand(t, k, generator=g) >= (0.3 if scenario == "drop" else 0.0)
    return idx_TK, keep_TK


def _params(e, f, d, glu, bias, dtype, device, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(device, dtype).requires_grad_()  # noqa: E731
    empty = torch.empty(0, dtype=dtype, device=device)
    return dict(
        w_up=mk(e, f, d), w_gate=mk(e, f, d) if glu else empty, w_down=mk(e, d, f),
        b_up=mk(e, f) if bias else empty, b_gate=mk(e, f) if bias and glu else empty,
        b_down=mk(e, d) if bias else empty,
    )  # fmt: skip


NAMES = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")


def _groups(n_exp: int, split: bool) -> list[tuple[int, int]]:
    cut = n_exp // 2
    return [(0, cut), (cut, n_exp)] if split else [(0, n_exp)]


def _fused(op, x, tok, w_N, offs, p, activation, split):
    """The op over the layer's expert groups, summed (as the layer graph does); ``expert_ffn``'s
    [N, D] rows are returned as they are (each group's rows are zero outside it)."""
    y = 0
    for first, last in _groups(p["w_up"].shape[0], split):
        q = [p[n][first:last] if p[n].numel() else p[n] for n in NAMES]
        if op == "combine":
            y = y + OPS.expert_ffn_combine(x, tok, w_N, offs, first, *q, activation)[0]
        else:
            y = y + OPS.expert_ffn(x, tok, offs, first, *q, activation)[0]
    return y


def _loop(op, x, tok, w_N, offs, p, activation):
    """Per expert: its rows' FFN, then (combine) weighted and added into their tokens."""
    has = lambda n: p[n].numel() > 0  # noqa: E731
    bounds = offs.tolist()
    y_ND = x.new_zeros(tok.shape[0], x.shape[1])
    for e in range(p["w_up"].shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        rows = x[tok[lo:hi]]
        up = rows @ p["w_up"][e].T + (p["b_up"][e] if has("b_up") else 0)
        if has("w_gate"):
            h = act(activation, rows @ p["w_gate"][e].T + (p["b_gate"][e] if has("b_gate") else 0)) * up
        else:
            h = act(activation, up)
        out = h @ p["w_down"][e].T + (p["b_down"][e] if has("b_down") else 0)
        y_ND = y_ND.index_put((torch.arange(lo, hi),), out)
    if op != "combine":
        return y_ND
    return x.new_zeros(x.shape).index_add(0, tok, y_ND * w_N.unsqueeze(1))


def _grads(y: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    probe = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)
    return list(torch.autograd.grad((y * probe).sum(), tensors))


# (scenario, T, K, kind, activation, bias)
SCENARIOS = {
    "empty": (7, 2, "glu", "silu", True),
    "busy": (64, 1, "mlp", "relu", False),
    "drop": (33, 2, "glu", "gelu_tanh", False),
    "drop-mlp": (9, 2, "mlp", "gelu", True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the norm, against fp64


def _check_op(op, scenario, dtype, d, f, split, device, on_device, assert_close_norm, n_exp=6):
    t, k, kind, activation, bias = SCENARIOS[scenario]
    idx_TK, keep_TK = _routing(t, k, n_exp, scenario.split("-")[0])
    tok, slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, n_exp)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_()
    w_N = (torch.rand(t * k, generator=g) * keep_TK.reshape(-1))[slot].to(device).requires_grad_()
    p = _params(n_exp, f, d, kind == "glu", bias, dtype, device)
    present = [n for n in NAMES if p[n].numel()]
    with on_device():
        y = _fused(op, x, tok.to(device), w_N, offs.to(device), p, activation, split)
        grads = _grads(
            y, [x, w_N, *(p[n] for n in present)] if op == "combine" else [x, *(p[n] for n in present)]
        )
    assert y.device.type == device.type and y.dtype == dtype
    # The oracle: the same values in fp64 on the CPU.
    x64 = x.detach().cpu().double().requires_grad_()
    w64 = w_N.detach().cpu().double().requires_grad_()
    p64 = {n: v.detach().cpu().double().requires_grad_() for n, v in p.items()}
    y64 = _loop(op, x64, tok, w64, offs, p64, activation)
    want = _grads(
        y64, [x64, w64, *(p64[n] for n in present)] if op == "combine" else [x64, *(p64[n] for n in present)]
    )
    rtol = TOL[dtype]
    assert_close_norm(y.float(), y64, rtol=rtol, what="y")
    names = ["x", "weight_N", *present] if op == "combine" else ["x", *present]
    for name, a, b in zip(names, grads, want, strict=True):
        assert_close_norm(a.float(), b, rtol=rtol, what=f"grad {name}")
    counts = (offs[1:] - offs[:-1]).tolist()
    for name, a in zip(names, grads, strict=True):  # experts without rows get exactly zero
        if name in present:
            for e, c in enumerate(counts):
                if c == 0:
                    assert a[e].abs().max() == 0, f"grad {name}[{e}] of an expert without rows"


@pytest.mark.parametrize("split", [False, True], ids=["whole", "two-groups"])
@pytest.mark.parametrize("d,f", [(48, 48), (100, 100), (48, 100)], ids=["48", "100", "48x100"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("op", ["ffn", "combine"])
def test_expert_op_matches_per_expert_loop(
    op, scenario, dtype, d, f, split, device, on_device, assert_close_norm
):
    _check_op(op, scenario, dtype, d, f, split, device, on_device, assert_close_norm)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "two-groups"])
@pytest.mark.parametrize("scenario", ["empty", "busy", "drop"])
@pytest.mark.parametrize("op", ["ffn", "combine"])
def test_expert_op_without_grouped_mm(op, scenario, split, device, on_device, assert_close_norm, monkeypatch):
    """The per-expert mm loop that stands in where grouped_mm does not apply, on aligned fp32."""
    monkeypatch.setattr(gemm, "_GMM", None)
    _check_op(op, scenario, torch.float32, 48, 48, split, device, on_device, assert_close_norm)


@pytest.mark.parametrize(
    "dtype,d,grouped",
    [
        (torch.bfloat16, 48, True),
        (torch.bfloat16, 100, False),
        (torch.float32, 48, True),
        (torch.float32, 100, True),
    ],
    ids=["bf16-48", "bf16-100", "fp32-48", "fp32-100"],
)
def test_grouped_mm_applies_where_aligned(dtype, d, grouped, device, on_device, monkeypatch):
    """grouped_mm runs for 16-byte aligned rows (fp32 100: 400 bytes) and not for bf16 100."""
    calls = []
    real = gemm._GMM
    if real is None:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    monkeypatch.setattr(gemm, "_GMM", lambda *a, **k: calls.append(1) or real(*a, **k))
    idx_TK, keep_TK = _routing(7, 2, 4, "empty")
    tok, _slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, 4)
    p = _params(4, d, d, True, False, dtype, device)
    x = torch.randn(7, d).to(device, dtype).requires_grad_()
    with on_device():
        y = _fused(
            "combine", x, tok.to(device), torch.rand(14, device=device), offs.to(device), p, "silu", False
        )
        y.sum().backward()
    assert bool(calls) == grouped


@pytest.mark.parametrize(
    "t",
    [
        64,
        63,
    ],
    ids=["128-rows", "126-rows"],
)
def test_whole_layer_group_syncs_nothing(t, device):
    """bf16, aligned, one group: the forward and backward never wait on the device (the
    sync-free path the grouped kernels promise; a fp32 grouped_mm is torch's own loop, which
    syncs)."""
    if device.type != "cuda":
        pytest.skip("device syncs exist on CUDA only")
    idx_TK, keep_TK = _routing(t, 2, 8, "drop")
    tok, _slot, offs = (v.to(device) for v in OPS.sort_by_expert(idx_TK, keep_TK, 8))
    p = _params(8, 64, 48, True, True, torch.bfloat16, device)
    x = torch.randn(t, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    w_N = torch.rand(2 * t, device=device, requires_grad=True)
    _fused("combine", x, tok, w_N, offs, p, "silu", False).sum().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _fused("combine", x, tok, w_N, offs, p, "silu", False).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- opcheck ------------------------------------------------------------------------------


def _op_args(scenario, dtype, device, first=0, n_exp=4, d=48, f=48):
    t, k, kind, activation, bias = SCENARIOS[scenario]
    idx_TK, keep_TK = _routing(t, k, n_exp, scenario)
    tok, _slot, offs = (v.to(device) for v in OPS.sort_by_expert(idx_TK, keep_TK, n_exp))
    x = torch.randn(t, d).to(device, dtype).requires_grad_()
    p = _params(n_exp, f, d, kind == "glu", bias, dtype, device)
    if first:
        p = {n: (v.detach()[first:].clone().requires_grad_() if v.numel() else v) for n, v in p.items()}
    w_N = torch.rand(tok.shape[0], device=device, requires_grad=True)
    ws = (*(p[n] for n in NAMES), activation)
    return (x, tok, offs, first, *ws), (x, tok, w_N, offs, first, *ws)


@pytest.mark.parametrize("first", [0, 2], ids=["whole", "second-group"])
@pytest.mark.parametrize(
    "scenario,dtype",
    # bf16 without biases: their gradients are sums of many rows by index_add_, whose order
    # (atomics) changes the bf16 rounding between opcheck's runs.
    [("empty", torch.float32), ("busy", torch.float32), ("busy", torch.bfloat16)],
    ids=["empty-fp32", "busy-fp32", "busy-bf16"],
)
def test_opcheck_expert_ops(scenario, dtype, first, device, on_device):
    """busy + second-group: the group gets no rows at all (grouped GEMMs over 0 rows)."""
    ffn_args, combine_args = _op_args(scenario, dtype, device, first=first)
    with on_device():
        for op, args in [(OPS.expert_ffn.default, ffn_args), (OPS.expert_ffn_combine.default, combine_args)]:
            result = torch.library.opcheck(op, args)
            assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_opcheck_routing_ops(device):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 8, generator=g).to(device).requires_grad_()
    bias, gumbel = torch.randn(8, generator=g).to(device), torch.randn(7, 8, generator=g).to(device)
    idx_TK, keep_TK = (v.to(device) for v in _routing(7, 2, 6, "drop"))
    weight_TK = torch.rand(7, 2, generator=g).to(device)
    cases = [
        (OPS.topk_route.default, (logits, bias, gumbel, 2, "softmax", "softmax_then_topk", True, 2.5, 4, 2,
                                  "top2_sum")),
        (OPS.topk_route.default, (logits, bias[:0], gumbel[:0], 3, "sigmoid", "softmax_then_topk", False, 1.0,
                                  0, 0, "max")),
        (OPS.sort_by_expert.default, (idx_TK, keep_TK, 6)),
        (OPS.capacity_keep.default, (idx_TK, weight_TK, keep_TK, weight_TK, 6, 0.5, 1, "score")),
        (OPS.expert_choice_select.default, (logits.detach().softmax(-1), 2.0, 1, 3)),
    ]  # fmt: skip
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
    faketensor = ("test_faketensor",)  # data-dependent solvers: their fake shapes
    torch.library.opcheck(OPS.sinkhorn_topk.default, (logits.detach(), 2, 100, 1e-4), test_utils=faketensor)
    torch.library.opcheck(OPS.balanced_assignment.default, (logits.detach(),), test_utils=faketensor)


def test_routing_ops_match_cpu_on_ties(device):
    """Coarsely quantised scores tie often: the device must pick the same experts and keep
    the same slots as the CPU (ties to the lower index everywhere)."""
    g = torch.Generator().manual_seed(4)
    for t, e in [(1, 4), (7, 8), (64, 8)]:
        z = (torch.randn(t, e, generator=g) * 2).round() / 2
        for args in [(2, "softmax", "softmax_then_topk", True, 1.0, 0, 0, "max"),
                     (2, "sigmoid", "softmax_then_topk", False, 1.0, 2, 1, "top2_sum"),
                     (3, "softmax", "topk_then_softmax", False, 1.0, 0, 0, "max")]:  # fmt: skip
            empty = torch.empty(0)
            want = OPS.topk_route(z, empty, empty, *args)
            got = OPS.topk_route(z.to(device), empty.to(device), empty.to(device), *args)
            assert torch.equal(got[1].cpu(), want[1]), (t, e, args)
            torch.testing.assert_close(got[0].cpu(), want[0])
        idx = want[1]
        w = (torch.rand(idx.shape, generator=g) * 4).round() / 4
        keep = torch.ones_like(idx, dtype=torch.bool)
        for policy in ["position", "score", "batch_priority", "random"]:
            args = (idx, w, keep, torch.rand(idx.shape, generator=g), e, 0.5, 1, policy)
            got = OPS.capacity_keep(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
            assert torch.equal(got.cpu(), OPS.capacity_keep(*args)), policy
        for got, want in zip(OPS.sort_by_expert(idx.to(device), keep.to(device), e),
                             OPS.sort_by_expert(idx, keep, e), strict=True):  # fmt: skip
            assert torch.equal(got.cpu(), want)
        scores = z.softmax(-1)
        for cf, group in [(1.0, 0), (2.0, 3)]:
            got = OPS.expert_choice_select(scores.to(device), cf, 1, group)
            assert torch.equal(got.cpu(), OPS.expert_choice_select(scores, cf, 1, group))
        assert torch.equal(OPS.balanced_assignment(z.to(device)).cpu(), OPS.balanced_assignment(z))
        # One token: Sinkhorn's column normalisation makes every plan entry equal in exact
        # arithmetic, so rounding (which differs between CPU and GPU) picks: not comparable.
        if t > 1:
            assert torch.equal(
                OPS.sinkhorn_topk(z.to(device), 2, 50, 0.0).cpu(), OPS.sinkhorn_topk(z, 2, 50, 0.0)
            )


# --- the grouped GEMMs themselves -------------------------------------------------------------


@pytest.mark.parametrize("pad", [4, 9], ids=["19-rows", "24-rows"])
@pytest.mark.parametrize("d", [48, 100])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gmm_and_wgrad_match_loop(dtype, d, pad, device, on_device, assert_close_norm):
    """Groups of 5, 0, 9, 0, 1 rows, then ``pad`` rows past the last offset holding NaN: those
    rows come out zero and take no part in the weight gradient; empty groups' gradients are
    zero. (The weight gradient reads the rows' transpose: grouped_mm applies to it only when
    the row count is aligned, 24 rows but not 19.)"""
    g = torch.Generator().manual_seed(6)
    counts = [5, 0, 9, 0, 1]
    offs = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    n, m = sum(counts) + pad, 40
    x = torch.randn(n, d, generator=g)
    x[sum(counts) :] = float("nan")
    w = torch.randn(len(counts), m, d, generator=g)
    gy = torch.randn(n, m, generator=g)
    gy[sum(counts) :] = float("nan")
    xd, wd, gyd, offd = x.to(device, dtype), w.to(device, dtype), gy.to(device, dtype), offs.to(device)
    with on_device():
        y = gemm.gmm(xd, wd, offd)
        y_known = gemm.gmm(xd, wd, offd, n_valid=sum(counts))
        gw = gemm.gmm_wgrad(gyd, xd, offd, len(counts))
    x64, w64, gy64 = (v.to(dtype).double() for v in (x, w, gy))  # the values the device saw
    want_y, want_gw = (
        torch.zeros(n, m, dtype=torch.float64),
        torch.zeros(len(counts), m, d, dtype=torch.float64),
    )
    for e, (lo, hi) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist(), strict=True)):
        want_y[lo:hi] = x64[lo:hi] @ w64[e].T
        want_gw[e] = gy64[lo:hi].T @ x64[lo:hi]
    rtol = TOL[dtype]
    assert_close_norm(y.float(), want_y, rtol=rtol, what="gmm")
    assert_close_norm(y_known.float(), want_y, rtol=rtol, what="gmm n_valid")
    assert_close_norm(gw.float(), want_gw, rtol=rtol, what="gmm_wgrad")
    for e, c in enumerate(counts):
        if c == 0:
            assert gw[e].abs().max() == 0, f"gmm_wgrad of empty group {e}"
