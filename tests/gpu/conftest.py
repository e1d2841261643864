"""The torch backend on a GPU: the same layers, ops and references as the CPU tests, run on a
CUDA device and compared with the CPU.

Every test here skips when its device is missing, so CI on the CPU only collects them (the
parameter lists are globs of specs/, nothing is built at collection). The device is
``$MOESPEC_GPU_TESTS_DEVICE`` (default ``cuda``). ``MOESPEC_GPU_TESTS_DEVICE=cpu`` is a dry run
of the test code itself on the CPU: the "device" side then runs the grouped kernels the other
devices run (``moespec.ops._expert_grouped``, with torch's grouped_mm allowed on the CPU),
compared with the CPU's blocked kernels, so every test must pass there too.

The fixtures hand helpers to the tests (pytest runs with --import-mode=importlib, so this
module is not importable): ``device``, ``on_device`` (a context for the device side's calls),
``tiny_spec``, ``make_inputs``, ``cpu_vs_device``, ``run_layer``, ``assert_close_norm``,
``move_away_on_device`` and ``router_conftest`` (tests/routers/conftest.py, loaded privately,
its gradient probe made on the device).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import moespec
import moespec.ops.expert_ffn as expert_ffn
from moespec.lower.fx import extra_inputs
from moespec.ops import gemm

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
DEVICE = os.environ.get("MOESPEC_GPU_TESTS_DEVICE", "cuda")
D_MODEL = 48  # divisible by every multi_head.heads the example specs use; 192 bytes in fp32


def _unavailable(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False); MOESPEC_GPU_TESTS_DEVICE=cpu dry-runs"
    if device.type not in ("cpu", "cuda"):
        return f"MOESPEC_GPU_TESTS_DEVICE={DEVICE}: only cpu (a dry run) and cuda are supported"
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    dev = torch.device(DEVICE)
    why = _unavailable(dev)
    if why:
        pytest.skip(why)
    return dev


@pytest.fixture(autouse=True)
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """Every test needs the device (it skips without) and runs with TF32 off, so fp32 GEMMs on
    the GPU are IEEE fp32 and compare tightly with the CPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def _on_device_kernels() -> Iterator[None]:
    """The kernels a non-CPU device runs, on the CPU: the grouped expert kernels and torch's
    grouped_mm (only the dry run needs this; on a GPU they run anyway)."""
    blocked, on_cpu = expert_ffn._BLOCKED_CPU, gemm._GMM_ON_CPU
    expert_ffn._BLOCKED_CPU, gemm._GMM_ON_CPU = False, True
    try:
        yield
    finally:
        expert_ffn._BLOCKED_CPU, gemm._GMM_ON_CPU = blocked, on_cpu


@pytest.fixture
def on_device(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """``with on_device(): ...`` around the device side's forward and backward."""
    return _on_device_kernels if device.type == "cpu" else contextlib.nullcontext


# --- specs --------------------------------------------------------------------------------


def tiny_spec(
    path: str | Path, *, d_model: int = D_MODEL, dtype: str = "fp32", device_type: str = "cpu"
) -> dict:
    """``specs/<path>`` made tiny and local: d_model shrunk and every d_ff too (as
    tests/test_checkpoint_doc.py's ``tiny_spec_dict``, but different widths stay different:
    the spec's k-th smallest d_ff becomes 4 + 2k units of its granularity, so hmoe's
    256/768/1280/1792 become 4/6/8/10), one process (placement.expert_parallel 1), the torch
    backend in ``dtype`` (router too) on ``device_type``."""
    path = Path(path)
    data = moespec.load_spec(path if path.is_absolute() else SPECS / path).spec.model_dump(mode="json")
    data.pop("model", None)  # the layer alone: a shrunk d_model may not fit the network's heads

    def walk(node, fn):
        if isinstance(node, dict):
            if isinstance(node.get("d_ff"), int):
                fn(node)
            for v in node.values():
                walk(v, fn)
        elif isinstance(node, list):
            for v in node:
                walk(v, fn)

    widths: set[int] = set()
    walk(data, lambda node: widths.add(node["d_ff"]))
    rank = {w: k for k, w in enumerate(sorted(widths))}

    def shrink(node):
        node["d_ff"] = (node.get("granularity") or 1) * (4 + 2 * rank[node["d_ff"]])

    walk(data, shrink)
    data.pop("extends", None)  # already merged
    data["d_model"] = d_model
    data["placement"] = {**(data.get("placement") or {}), "expert_parallel": 1}
    data["target"] = {"backend": "torch", "device": device_type, "dtype": dtype, "router_dtype": dtype}
    return data


@pytest.fixture(name="tiny_spec")
def _tiny_spec() -> Callable[..., dict]:
    return tiny_spec


def make_inputs(ir, lead: tuple[int, ...], seed: int, *, flat: bool = False) -> dict[str, torch.Tensor]:
    """CPU values for the extra inputs of the layer IR ``ir`` (hash routing's input_ids, MoE++'s
    previous router logits), per token: of shape ``lead`` + trailing, or (``flat``) [T, ...]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in extra_inputs(ir):
        shape = ((math.prod(lead),) if flat else lead) + e.trailing
        if e.dtype == "float":
            out[e.name] = torch.randn(shape, generator=g)
        else:
            out[e.name] = torch.randint(0, 997, shape, generator=g)
    return out


@pytest.fixture(name="make_inputs")
def _make_inputs() -> Callable[..., dict[str, torch.Tensor]]:
    return make_inputs


# --- running and comparing ------------------------------------------------------------------


@dataclass
class Run:
    """One forward + backward of a layer, everything on the CPU for comparison."""

    y: torch.Tensor
    aux: torch.Tensor
    logits: torch.Tensor | None
    x_grad: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    state: dict[str, torch.Tensor]  # after the call: buffers a training step updates
    stats: dict[str, torch.Tensor]
    devices: set[torch.device]  # of every tensor the layer returned or kept


def run_layer(layer, x: torch.Tensor, inputs: dict[str, torch.Tensor], *, training: bool) -> Run:
    """``layer(x, **inputs)`` (inputs moved to x's device), then backward of
    ``sum(y * probe) + aux_loss`` with a fixed probe; returns the results on the CPU."""
    layer.train(training)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x, **{k: v.to(x.device) for k, v in inputs.items()})
    aux = layer.aux_loss
    probe = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)
    loss = (y * probe).sum()
    if aux is not None:
        loss = loss + aux.to(loss.dtype)
    loss.backward()
    kept = [
        y,
        x.grad,
        *layer.routing_stats.values(),
        *(t for t in (aux, layer.router_logits) if t is not None),
    ]
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return Run(
        y=cpu(y),
        aux=cpu(aux) if aux is not None else torch.zeros(()),
        logits=cpu(layer.router_logits),
        x_grad=cpu(x.grad),
        grads={n: cpu(p.grad) for n, p in layer.named_parameters()},
        state={k: cpu(v) for k, v in layer.state_dict().items()},
        stats={k: cpu(v) for k, v in layer.routing_stats.items()},
        devices={t.device for t in kept},
    )


def assert_close_norm(got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-9,
                      what: str = "") -> None:  # fmt: skip
    """``got`` ≈ ``want`` relative to the norm: ||got - want|| <= rtol ||want|| + atol sqrt(n)
    over the finite entries (in fp64); non-finite entries must match exactly. Integer and
    bool tensors must be equal."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.is_floating_point():
        assert torch.equal(got.to(want.dtype), want), f"{what}: {got} != {want}"
        return
    got, want = got.double(), want.double()
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite), f"{what}: non-finite entries differ"
    torch.testing.assert_close(got[~finite], want[~finite], equal_nan=True, msg=f"{what}: non-finite")
    err = float((got[finite] - want[finite]).norm())
    ref = float(want[finite].norm())
    bound = rtol * ref + atol * math.sqrt(max(int(finite.sum()), 1))
    assert err <= bound, f"{what}: |got - want| = {err:.3g} > {bound:.3g} (|want| = {ref:.3g}, rtol {rtol:g})"


@pytest.fixture(name="assert_close_norm")
def _assert_close_norm() -> Callable[..., None]:
    return assert_close_norm


@pytest.fixture(name="run_layer")
def _run_layer() -> Callable[..., Run]:
    return run_layer


def compare_runs(got: Run, want: Run, *, rtol: float, atol: float = 1e-9, stats: bool = True) -> None:
    """Two runs of one layer agree: output, aux loss, router logits, x's and every parameter's
    gradient, the state after the call and (``stats``) the routing statistics."""
    close = lambda a, b, what: assert_close_norm(a, b, rtol=rtol, atol=atol, what=what)  # noqa: E731
    close(got.y, want.y, "output")
    close(got.aux, want.aux, "aux_loss")
    if want.logits is not None:
        close(got.logits, want.logits, "router_logits")
    close(got.x_grad, want.x_grad, "x.grad")
    assert got.grads.keys() == want.grads.keys()
    for name, g in want.grads.items():
        h = got.grads[name]
        assert (g is None) == (h is None), f"{name}.grad: {h is None=} but {g is None=}"
        if g is not None:
            close(h, g, f"{name}.grad")
    assert got.state.keys() == want.state.keys()
    for name, v in want.state.items():
        close(got.state[name], v, f"state {name}")
    if stats:
        assert got.stats.keys() == want.stats.keys()
        for name, v in want.stats.items():
            close(got.stats[name], v, f"routing_stats[{name}]")


@torch.no_grad()
def _move_away(module: torch.nn.Module, from_init: Callable[[torch.nn.Module], None]) -> None:
    """``from_init`` (tests/conftest.py's ``move_away_from_init``: weights no init produces) on
    a module of any device: done on the CPU, where its seeded noise is drawn."""
    dev = next(iter(module.state_dict().values())).device
    module.cpu()
    from_init(module)
    module.to(dev)


def cpu_vs_device(
    data: dict,
    device: torch.device,
    on_device: Callable[[], contextlib.AbstractContextManager],
    move_away: Callable[[torch.nn.Module], None],
    *,
    layer: str | None = None,
    lead: tuple[int, ...] = (2, 7),
    training: bool = True,
    moved: bool = True,
    rtol: float = 1e-4,
) -> tuple[Run, Run]:
    """Build the spec on the CPU and on ``device`` (same seed and generator seed: weights are
    drawn on the CPU whatever the device, so they must be bit-identical), move the weights
    away from their init (``moved``), run both on the same input and compare everything
    (:func:`compare_runs`). Returns ``(cpu_run, device_run)``."""
    kw = dict(layer=layer, seed=3)
    cpu = moespec.build(data, **kw, generator=torch.Generator().manual_seed(11), device="cpu")
    dev = moespec.build(data, **kw, generator=torch.Generator().manual_seed(11), device=device)
    state_cpu, state_dev = cpu.state_dict(), dev.state_dict()
    assert state_cpu.keys() == state_dev.keys()
    for k, v in state_cpu.items():
        assert state_dev[k].device.type == device.type, f"{k} is on {state_dev[k].device}"
        assert torch.equal(state_dev[k].cpu(), v), f"{k}: the device build drew other weights"
    if moved:
        move_away(cpu)
        dev.load_state_dict(cpu.state_dict())
    x = torch.randn(*lead, cpu.d_model, generator=torch.Generator().manual_seed(5))
    inputs = make_inputs(cpu.ir, lead, seed=6)
    want = run_layer(cpu, x, inputs, training=training)
    with on_device():
        got = run_layer(dev, x.to(device), inputs, training=training)
    assert want.devices == {torch.device("cpu")}
    assert {d.type for d in got.devices} == {device.type}, f"results on {got.devices}"
    compare_runs(got, want, rtol=rtol)
    return want, got


@pytest.fixture(name="cpu_vs_device")
def _cpu_vs_device(device, on_device, move_away_from_init) -> Callable[..., tuple[Run, Run]]:
    return lambda data, **kw: cpu_vs_device(data, device, on_device, move_away_from_init, **kw)


# --- tests/routers/conftest.py on the device --------------------------------------------------


def _load(rel: str, name: str):
    """A private copy of a test helper module (not the one pytest registered)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _TorchOn:
    """``torch`` for a private copy of tests/routers/conftest.py: the same module, except that
    ``linspace`` (its gradient probe, the one tensor it makes itself) is made on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self._device = device

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def linspace(self, *args, **kwargs) -> torch.Tensor:
        return torch.linspace(*args, **{"device": self._device, **kwargs})


@pytest.fixture(scope="session")
def router_conftest(device: torch.device):
    """tests/routers/conftest.py (``compare``, ``run_both``, ...) comparing module and reference
    on ``device``: give it a spec whose target.device is the device, inputs on the device and
    ``away=`` the fixture ``move_away_on_device``."""
    mod = _load("tests/routers/conftest.py", "_moespec_gpu_tests_router_conftest")
    mod.torch = _TorchOn(device)
    return mod


@pytest.fixture
def move_away_on_device(move_away_from_init) -> Callable[[torch.nn.Module], None]:
    return lambda module: _move_away(module, move_away_from_init)
