"""Fused custom ops (sort_by_expert, expert_ffn, expert_ffn_combine) against a per-token loop
reference.

Matrix: forward and every gradient, fp64 gradcheck on tiny shapes, fp32 on odd shapes
(T in 1, 7, 64; D 48/100), an expert with no tokens, all tokens on one expert, dropped rows,
every activation, mlp and glu, with and without bias, the clamped GLU (GPT-OSS's limit, alpha
and up + 1; DeepSeek-V4's limit alone); torch.library.opcheck on every op.
Each case runs expert_ffn (its rows combined here by index_add) and expert_ffn_combine, with the
CPU's blocked kernels and with the grouped kernels the other devices run (forced onto the CPU).
The CPU kernels' parallel and recycled-buffer paths (off at these tiny shapes) are forced on
for the same cases, with experts in one or several row blocks, in inference mode too.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import moespec.ops.dispatch  # noqa: F401
import moespec.ops.expert_ffn as expert_ffn
from moespec.ops import _buffers, _expert_cpu, _expert_cpu_small, _parallel, gemm
from moespec.ops.activations import act

OPS = torch.ops.moespec


def _routing(t: int, k: int, e: int, *, busy: int | None = None, drop: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx_TK = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if busy is not None:  # every token's first choice is `busy`; keep choices distinct
        for row in idx_TK:
            j = (row == busy).nonzero()
            if len(j):
                row[j[0, 0]] = row[0].clone()
            row[0] = busy
    keep_TK = torch.rand(t, k, generator=g) >= drop
    return idx_TK, keep_TK


def _params(e, f, d, glu, bias, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=dtype) * 0.3).requires_grad_()  # noqa: E731
    empty = torch.empty(0, dtype=dtype)
    return dict(
        w_up=mk(e, f, d), w_gate=mk(e, f, d) if glu else empty, w_down=mk(e, d, f),
        b_up=mk(e, f) if bias else empty, b_gate=mk(e, f) if bias and glu else empty,
        b_down=mk(e, d) if bias else empty,
    )  # fmt: skip


class Mode(NamedTuple):
    combined: bool = False  # expert_ffn_combine, or expert_ffn then a plain combine
    split: bool = True  # experts in two groups when there are more than 4


ROWS = Mode()


def _fused(x, idx_TK, keep_TK, w_TK, p, activation, mode: Mode = ROWS):
    """The layer's routed experts through the fused ops (the layer graph sums the groups' outputs)."""
    n_exp = p["w_up"].shape[0]
    tok, slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, n_exp)
    w_N = (w_TK * keep_TK).reshape(-1)[slot]
    cut = n_exp // 2 if n_exp > 4 and mode.split else n_exp
    y = 0
    for first, last in ((0, cut), (cut, n_exp)) if cut < n_exp else ((0, n_exp),):
        q = {k: v[first:last] if v.numel() else v for k, v in p.items()}
        w = (q["w_up"], q["w_gate"], q["w_down"], q["b_up"], q["b_gate"], q["b_down"], activation)
        if mode.combined:
            y = y + OPS.expert_ffn_combine(x, tok, w_N, offs, first, *w)[0]
        else:
            y_ND = OPS.expert_ffn(x, tok, offs, first, *w)[0]
            y = y + torch.zeros_like(x).index_add(0, tok, y_ND * w_N.unsqueeze(1))
    return y


@pytest.fixture(
    params=[
        "rows",
        "combined",
        "few-rows",
        "few-combined",
        "grouped-rows",
        "grouped-combined",
        "grouped-whole-rows",
        "grouped-whole-combined",
    ]
)
def kernels(request, monkeypatch) -> Mode:
    """Which op (expert_ffn + a plain combine, or expert_ffn_combine) and which kernels: the
    CPU's blocked ones, its few-rows ones (``_expert_cpu_small``), or the grouped ones of
    other devices. "whole": one expert group (the
    grouped kernels' sync-free path) with torch's grouped_mm allowed on the CPU."""
    grouped, whole = request.param.startswith("grouped"), "whole" in request.param
    if not request.param.startswith("few"):  # the blocked CPU path at these sizes
        monkeypatch.setattr(_expert_cpu_small, "takes", lambda counts: False)
    monkeypatch.setattr(expert_ffn, "_BLOCKED_CPU", not grouped)
    monkeypatch.setattr(gemm, "_GMM_ON_CPU", whole)
    return Mode(combined=request.param.endswith("combined"), split=not whole)


def _loop(x, idx_TK, keep_TK, w_TK, p, activation):
    out = []
    has = lambda name: p[name].numel() > 0  # noqa: E731
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(idx_TK.shape[1]):
            if not keep_TK[t, j]:
                continue
            e = idx_TK[t, j]
            up = x[t] @ p["w_up"][e].T + (p["b_up"][e] if has("b_up") else 0)
            if has("w_gate"):
                gate = x[t] @ p["w_gate"][e].T + (p["b_gate"][e] if has("b_gate") else 0)
                h = _gated(activation, gate, up)
            else:
                h = act(activation, up)
            acc = acc + w_TK[t, j] * (h @ p["w_down"][e].T + (p["b_down"][e] if has("b_down") else 0))
        out.append(acc)
    return torch.stack(out)


# The clamped GLU's ops argument (FFNSpec.op_activation): limits small enough to clamp here.
GPT_OSS = "silu;limit=1.0;alpha=1.702;up_offset=1.0"
LIMIT_ONLY = "silu;limit=0.8"
OFFSET_GELU = "gelu;up_offset=1.0"
SOFTCAP = "silu;gate_softcap=0.8;up_softcap=1.5"  # Inkling-2's form


def _gated(activation: str, gate, up):
    """act(gate) * up, or the clamped form written as GPT-OSS's ``_apply_gate`` does."""
    name, *opts = activation.split(";")
    o = {k: float(v) for k, v in (s.split("=") for s in opts)}
    if "limit" in o:
        gate, up = gate.clamp(min=None, max=o["limit"]), up.clamp(min=-o["limit"], max=o["limit"])
    if "up_softcap" in o:  # Inkling-2's softcapped SwiGLU: c tanh(v / c)
        up = torch.tanh(up / o["up_softcap"]) * o["up_softcap"]
    if "gate_softcap" in o:
        lin = torch.tanh(gate / o["gate_softcap"]) * o["gate_softcap"]
        return (up + o.get("up_offset", 0.0)) * lin * torch.sigmoid(gate * o.get("alpha", 1.0))
    a = gate * torch.sigmoid(gate * o["alpha"]) if "alpha" in o else act(name, gate)
    return (up + o.get("up_offset", 0.0)) * a


def _grads(fn, x, w_TK, p):
    y = fn()
    names = [n for n, v in p.items() if v.numel() > 0]
    tensors = [x, w_TK, *(p[n] for n in names)]
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), tensors)
    return y, grads


CASES = [
    # (T, D, F, E, K, kind, activation, bias, busy, drop)
    (1, 48, 100, 4, 2, "glu", "silu", False, None, 0.0),
    (7, 100, 48, 5, 2, "mlp", "gelu", True, None, 0.0),
    (7, 48, 100, 6, 1, "glu", "gelu_tanh", True, None, 0.3),
    (64, 48, 100, 8, 2, "mlp", "relu", False, 3, 0.0),  # all tokens on expert 3
    (64, 100, 48, 8, 3, "glu", "silu", True, None, 0.2),
    # Many experts with few rows each
    (64, 48, 40, 32, 2, "glu", "silu", True, None, 0.2),
    (7, 100, 48, 16, 3, "mlp", "gelu_tanh", False, None, 0.0),
    # The clamped GLU
    (1, 48, 100, 4, 2, "glu", GPT_OSS, True, None, 0.0),
    (7, 100, 48, 5, 2, "glu", LIMIT_ONLY, False, None, 0.3),
    (64, 48, 100, 8, 2, "glu", GPT_OSS, True, 3, 0.0),  # all tokens on expert 3
    (64, 48, 40, 32, 2, "glu", OFFSET_GELU, True, None, 0.2),
    (7, 48, 100, 6, 2, "glu", SOFTCAP, True, None, 0.2),
    (64, 100, 48, 8, 2, "glu", SOFTCAP + ";limit=1.2", False, 3, 0.0),
]


def _fused_equals_loop(t, d, f, e, k, kind, activation, bias, busy, drop, mode):
    """Run the fused op and the per-expert loop on one case; assert output and every gradient
    agree; return the fused output and gradients and a closure re-running it (for
    repeatability checks)."""
    idx_TK, keep_TK = _routing(t, k, e, busy=busy, drop=drop)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, d, generator=g, requires_grad=True)
    w_TK = torch.rand(t, k, generator=g, requires_grad=True)
    p = _params(e, f, d, kind == "glu", bias, torch.float32)

    def fused():
        return _grads(lambda: _fused(x, idx_TK, keep_TK, w_TK, p, activation, mode), x, w_TK, p)

    y1, g1 = fused()
    y2, g2 = _grads(lambda: _loop(x, idx_TK, keep_TK, w_TK, p, activation), x, w_TK, p)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return y1, g1, fused


@pytest.mark.parametrize("t,d,f,e,k,kind,activation,bias,busy,drop", CASES)
def test_fused_matches_loop_forward_and_grads(kernels, t, d, f, e, k, kind, activation, bias, busy, drop):
    _fused_equals_loop(t, d, f, e, k, kind, activation, bias, busy, drop, kernels)


def test_empty_expert_gets_zero_weight_grad(kernels):
    idx_TK = torch.tensor([[0, 1], [1, 0], [0, 1]])  # expert 2 gets nothing
    keep_TK = torch.ones(3, 2, dtype=torch.bool)
    x = torch.randn(3, 8, requires_grad=True)
    p = _params(3, 4, 8, True, True, torch.float32)
    _fused(x, idx_TK, keep_TK, torch.ones(3, 2), p, "silu", kernels).sum().backward()
    assert p["w_up"].grad[2].abs().sum() == 0 and p["w_down"].grad[2].abs().sum() == 0
    assert p["w_up"].grad[0].abs().sum() > 0


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", GPT_OSS, LIMIT_ONLY, SOFTCAP])
@pytest.mark.parametrize("kind,bias", [("glu", True), ("mlp", False)])
def test_gradcheck_fp64(kernels, activation, kind, bias):
    if kind == "mlp" and ";" in activation:
        pytest.skip("the clamped options are the gated form's")
    idx_TK, keep_TK = _routing(5, 2, 3, drop=0.2, seed=3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    p = _params(3, 6, 4, kind == "glu", bias, torch.float64)
    names = [n for n, v in p.items() if v.numel() > 0]

    def fn(x, w_TK, *tensors):
        q = {**p, **dict(zip(names, tensors, strict=False))}
        return _fused(x, idx_TK, keep_TK, w_TK, q, activation, kernels)

    assert torch.autograd.gradcheck(fn, (x, w_TK, *(p[n] for n in names)), fast_mode=True)


def test_sort_by_expert_invariants():
    idx_TK, keep_TK = _routing(64, 3, 8, drop=0.25, seed=5)
    tok, slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, 8)
    expert_N = idx_TK.reshape(-1)[slot]
    kept = int(keep_TK.sum())
    assert offs[0] == 0 and offs[-1] == kept
    counts = torch.bincount(idx_TK[keep_TK], minlength=8)
    assert torch.equal(offs[1:] - offs[:-1], counts)
    for e in range(8):
        rows = slice(int(offs[e]), int(offs[e + 1]))
        assert torch.all(expert_N[rows] == e)
        assert torch.all(tok[rows][1:] >= tok[rows][:-1])  # stable: token order kept
    assert not keep_TK.reshape(-1)[slot[kept:]].any()  # dropped rows at the end
    assert torch.equal(tok, slot // 3)


def test_expert_group_without_rows(kernels):
    """Every token routes into the first half of the experts: with the layer split in two
    groups the second gets no rows at all (its op adds zeros, its weights' gradients are 0)."""
    g = torch.Generator().manual_seed(5)
    idx_TK = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(7)])
    keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
    x = torch.randn(7, 48, generator=g, requires_grad=True)
    w_TK = torch.rand(7, 2, generator=g, requires_grad=True)
    p = _params(8, 100, 48, True, True, torch.float32)
    y1, g1 = _grads(
        lambda: _fused(x, idx_TK, keep_TK, w_TK, p, "silu", Mode(kernels.combined, split=True)), x, w_TK, p
    )
    y2, g2 = _grads(lambda: _loop(x, idx_TK, keep_TK, w_TK, p, "silu"), x, w_TK, p)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert all(gr[4:].abs().max() == 0 for gr in g1[2:])  # the empty group's experts


@pytest.mark.parametrize("activation", ["silu", GPT_OSS])
def test_opcheck_every_op(activation):
    idx_TK, keep_TK = _routing(7, 2, 4, drop=0.2)
    tok, _slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, 4)
    x = torch.randn(7, 12, requires_grad=True)
    p = _params(4, 10, 12, True, True, torch.float32)
    w = (p["w_up"], p["w_gate"], p["w_down"], p["b_up"], p["b_gate"], p["b_down"])
    args = (x, tok, offs, 0, *w, activation)
    w_N = torch.rand(14, requires_grad=True)
    for op, a in [
        (OPS.expert_ffn.default, args),
        (OPS.expert_ffn_combine.default, (*args[:2], w_N, *args[2:])),
        (OPS.sort_by_expert.default, (idx_TK, keep_TK, 4)),
    ]:
        result = torch.library.opcheck(op, a)
        assert all(v == "SUCCESS" for v in result.values()), result


# --- parallel CPU path, forced on ---


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["one_block", "small_blocks"])
def forced(request, monkeypatch, two_threads):
    """The parallel path and recycled buffers at tiny shapes, on 2 threads."""
    monkeypatch.setattr(_expert_cpu, "_PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_expert_cpu, "_PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(_expert_cpu_small, "takes", lambda counts: False)
    monkeypatch.setattr(_buffers, "MIN_BYTES", 0)
    if request.param == "small_blocks":  # experts span several blocks
        monkeypatch.setattr(_expert_cpu, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(_expert_cpu, "_MIN_BLOCK_ROWS", 3)
    yield
    _buffers.release()


@pytest.mark.parametrize("t,d,f,e,k,kind,activation,bias,busy,drop", CASES)
@pytest.mark.parametrize("combined", [False, True])
def test_parallel_matches_loop(forced, t, d, f, e, k, kind, activation, bias, busy, drop, combined):
    assert _parallel.threads() == 2
    y1, g1, fused = _fused_equals_loop(t, d, f, e, k, kind, activation, bias, busy, drop, Mode(combined))
    y3, g3 = fused()
    assert torch.equal(y1, y3)  # deterministic, recycled buffers included
    for a, b in zip(g1, g3, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("combined", [False, True])
def test_parallel_inference_mode(forced, combined):
    idx_TK, keep_TK = _routing(64, 2, 8, drop=0.1)
    x = torch.randn(64, 48)
    w_TK = torch.rand(64, 2)
    p = {k: v.detach() for k, v in _params(8, 40, 48, True, True, torch.float32).items()}
    with torch.inference_mode():
        y1 = _fused(x, idx_TK, keep_TK, w_TK, p, "silu", Mode(combined))
    torch.testing.assert_close(y1, _loop(x, idx_TK, keep_TK, w_TK, p, "silu"), atol=1e-5, rtol=1e-5)


def test_worker_error_propagates(forced):
    hits = []

    def bad() -> None:
        raise ValueError("boom")

    for pieces in ([bad, lambda: hits.append(1)], [lambda: hits.append(1), bad]):
        with pytest.raises(ValueError, match="boom"):
            _parallel.run(pieces)
    assert hits == [1, 1]  # the other piece ran to the end


def test_expert_units_keep_experts_whole():
    assert _expert_cpu.expert_units([0, 0, 0, 1, 2, 2, 3]) == [[0, 1, 2], [3], [4, 5], [6]]
    assert _expert_cpu.expert_units([]) == []


def test_workers_count_experts_not_blocks(two_threads, monkeypatch):
    """One expert cut into many blocks runs in one worker (it takes whole experts): no second
    worker, so BLAS keeps every thread for its GEMMs."""
    monkeypatch.setattr(_expert_cpu, "_PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(_expert_cpu, "_PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(_expert_cpu_small, "takes", lambda counts: False)
    monkeypatch.setattr(_expert_cpu, "_MIN_BLOCK_ROWS", 2)
    monkeypatch.setattr(_expert_cpu, "_BLOCK_BYTES", 1)
    one = _expert_cpu.Group.of(torch.arange(10), [0, 10, 10], 0, 2, 4, 4, 4)
    assert len(one.experts) == 5 and one.workers(4, 4) == 1
    two = _expert_cpu.Group.of(torch.arange(10), [0, 6, 10], 0, 2, 4, 4, 4)
    assert two.workers(4, 4) == 2


def test_combine_weights_in_another_dtype(kernels):
    """fp64 tokens with fp32 routing weights (the layer's router dtype may differ from x's):
    the weights are used in x's dtype and their gradient comes back in their own dtype."""
    idx_TK, keep_TK = _routing(7, 2, 6, drop=0.2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w_TK = torch.rand(7, 2, generator=g, requires_grad=True)  # fp32
    p = _params(6, 10, 12, True, True, torch.float64)
    y = _fused(x, idx_TK, keep_TK, w_TK, p, "silu", kernels)
    assert y.dtype == torch.float64
    (gw,) = torch.autograd.grad(y.sum(), [w_TK])
    assert gw.dtype == torch.float32
    w64 = w_TK.detach().double().requires_grad_()
    ref = _loop(x, idx_TK, keep_TK, w64, p, "silu")
    torch.testing.assert_close(y, ref)
    (gw_ref,) = torch.autograd.grad(ref.sum(), [w64])
    torch.testing.assert_close(gw, gw_ref.float())


@pytest.mark.parametrize("missing", ["b_gate", "b_down"])
def test_biases_come_all_or_none(missing):
    idx_TK, keep_TK = _routing(5, 2, 4)
    p = {k: v.detach() for k, v in _params(4, 6, 8, True, True, torch.float32).items()}
    p[missing] = torch.empty(0)
    with pytest.raises(ValueError, match="all or none"):
        _fused(torch.randn(5, 8), idx_TK, keep_TK, torch.rand(5, 2), p, "silu", Mode(combined=True))


@pytest.mark.parametrize("combined", [False, True])
def test_grouped_kernels_whole_layer_read_nothing_back(monkeypatch, combined):
    """The grouped kernels (other devices) on a whole-layer group, with grouped_mm applying:
    no .item() / .tolist() (each a device sync off the CPU), forward or backward."""
    monkeypatch.setattr(expert_ffn, "_BLOCKED_CPU", False)
    monkeypatch.setattr(gemm, "_GMM_ON_CPU", True)
    idx_TK, keep_TK = _routing(16, 2, 4, drop=0.25)
    x = torch.randn(16, 32, requires_grad=True)
    w_TK = torch.rand(16, 2, requires_grad=True)
    p = _params(4, 16, 32, True, True, torch.float32)

    def no_sync(*_args, **_kwargs):
        raise AssertionError("read back to the host")

    y_ref = _fused(x, idx_TK, keep_TK, w_TK, p, "silu", Mode(combined, split=False))
    tok, slot, offs = OPS.sort_by_expert(idx_TK, keep_TK, 4)
    w_N = (w_TK * keep_TK).reshape(-1)[slot]
    ws = (p["w_up"], p["w_gate"], p["w_down"], p["b_up"], p["b_gate"], p["b_down"], "silu")
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_sync)
        m.setattr(torch.Tensor, "tolist", no_sync)
        if combined:
            y = OPS.expert_ffn_combine(x, tok, w_N, offs, 0, *ws)[0]
        else:
            y = OPS.expert_ffn(x, tok, offs, 0, *ws)[0]
        y.backward(torch.ones_like(y))
    if not combined:
        y = torch.zeros_like(x).index_add(0, tok, y * w_N.unsqueeze(1))
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("combined", [True, False], ids=["combined", "rows"])
def test_few_rows_forward_runs_for_decode(monkeypatch, combined):
    """A handful of rows (decode) take the CPU's few-rows path; forward and every gradient equal
    the per-token loop (mlp with bias here; the CASES above run it too, the few-* modes)."""
    calls = []
    real = _expert_cpu_small.forward_few
    monkeypatch.setattr(_expert_cpu_small, "forward_few", lambda *a: calls.append(1) or real(*a))
    t, d, f, e, k = 3, 48, 40, 4, 2
    idx_TK, keep_TK = _routing(t, k, e)
    p = _params(e, f, d, False, True, torch.float32)
    x = torch.randn(t, d, requires_grad=True)
    w_TK = torch.rand(t, k, requires_grad=True)
    mode = Mode(combined=combined, split=False)
    y, got = _grads(lambda: _fused(x, idx_TK, keep_TK, w_TK, p, "gelu", mode), x, w_TK, p)
    want_y, want = _grads(lambda: _loop(x, idx_TK, keep_TK, w_TK, p, "gelu"), x, w_TK, p)
    assert calls
    torch.testing.assert_close(y, want_y, atol=1e-5, rtol=1e-4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_few_rows_rule():
    takes = _expert_cpu_small.takes
    assert takes([3, 0, 5]) and takes([0] * 100 + [200]) and takes([60] * 8)  # few rows; few per expert
    assert not takes([256] * 8) and not takes([300])  # many rows per expert: the blocked path
