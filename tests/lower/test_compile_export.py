"""Built modules under torch.compile(fullgraph=True) and torch.export with a dynamic T."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.export import Dim

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every case compiles a different graph; keep them from sharing a recompile budget.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CASES = ["debug-tiny.yaml", "debug-hetero.yaml", "debug-capacity.yaml", "debug-base.yaml"]


def _build(name: str, **kw) -> torch.nn.Module:
    layer = "late" if "groups" in name else None
    return moespec.build(str(SPECS / name), layer=layer, **kw)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_compile_fullgraph_matches_eager(name: str, training: bool):
    m = _build(name).train(training)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    y_eager = m(x)
    aux_eager = m.aux_loss
    m.load_state_dict(state)  # undo the expert-bias update of the eager call
    torch.manual_seed(1)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(m.aux_loss, aux_eager)
    (y_comp.sum() + m.aux_loss).backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_identical_layers_share_one_compilation():
    # Many layers of one spec, each compiled on its own (as per-block compile does), must
    # not hit dynamo's recompile limit (8): they share one generated forward function.
    layers = [_build("debug-tiny.yaml", seed=i).eval() for i in range(12)]
    x = torch.randn(7, 32)
    with torch._dynamo.config.patch(recompile_limit=2):
        for layer in layers:
            torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="eager")(x), layer(x))


@pytest.mark.slow
def test_inductor_compile_forward_backward():
    m = _build("debug-tiny.yaml").eval()
    x = torch.randn(7, 32, requires_grad=True)
    y = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(y, m(x))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", CASES)
def test_export_with_dynamic_tokens(name: str, tmp_path: Path):
    m = _build(name).eval()
    ep = torch.export.export(m, (torch.randn(9, 32),), dynamic_shapes={"x": {0: Dim("T", min=2, max=65536)}})
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "moespec.topk_route.default" in ops and "moespec.expert_ffn_combine.default" in ops
    for t in (2, 33, 100):
        x = torch.randn(t, 32)
        torch.testing.assert_close(ep.module()(x), m(x))
    if name != "debug-hetero.yaml":
        return  # the fresh-process load below is slow; one spec with every expert kind suffices
    path = tmp_path / "layer.pt2"
    torch.export.save(ep, path)
    x = torch.randn(5, 32)
    torch.save(x, tmp_path / "x.pt")
    torch.save(m(x), tmp_path / "y.pt")
    # A fresh process needs only `import moespec.ops` to load and run the program.
    code = (
        "import sys, torch, moespec.ops;"
        f"ep = torch.export.load(r'{path}');"
        f"x = torch.load(r'{tmp_path / 'x.pt'}'); y = torch.load(r'{tmp_path / 'y.pt'}');"
        "torch.testing.assert_close(ep.module()(x), y); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
