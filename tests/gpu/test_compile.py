"""``torch.compile(fullgraph=True)`` of built layers on the device, forward + backward, equal to
eager: AOT autograd over the custom ops' fake implementations for several router kinds (the
expert-choice graph has a data-dependent row count), and one inductor compile."""

from __future__ import annotations

import pytest
import torch

import moespec


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fwd_bwd(fn, layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    aux = layer.aux_loss
    probe = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    ((y * probe).sum() + aux).backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), aux.detach(), x.grad, grads


def _compiled_equals_eager(name, backend, training, device, on_device, tiny_spec, assert_close_norm):
    data = tiny_spec(name)
    layer = moespec.build(data, seed=2, device=device).train(training)  # global RNG: compile traces it
    x = torch.randn(3, 7, layer.d_model, generator=torch.Generator().manual_seed(0)).to(device)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    with on_device():
        torch.manual_seed(1)
        y0, a0, gx0, g0 = _fwd_bwd(layer, layer, x)
        layer.load_state_dict(state)  # undo the eager step's state update (expert bias)
        torch.manual_seed(1)
        y1, a1, gx1, g1 = _fwd_bwd(compiled, layer, x)
    assert y1.device.type == device.type
    assert_close_norm(y1, y0, rtol=1e-5, what="output")
    assert_close_norm(a1, a0, rtol=1e-5, what="aux_loss")
    assert_close_norm(gx1, gx0, rtol=1e-5, what="x.grad")
    assert g1.keys() == g0.keys()
    for n in g0:
        assert_close_norm(g1[n], g0[n], rtol=1e-5, what=f"{n}.grad")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "name",
    ["debug-tiny.yaml", "debug-hetero.yaml", "debug-capacity.yaml", "expert-choice.yaml", "soft-moe.yaml"],
)
def test_aot_compile_matches_eager(name, training, device, on_device, tiny_spec, assert_close_norm):
    _compiled_equals_eager(name, "aot_eager", training, device, on_device, tiny_spec, assert_close_norm)


def test_inductor_compile_matches_eager(device, on_device, tiny_spec, assert_close_norm, monkeypatch):
    """Inductor generates the glue code around the custom ops (Triton on CUDA)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    _compiled_equals_eager(
        "debug-tiny.yaml", "inductor", True, device, on_device, tiny_spec, assert_close_norm
    )
