"""Shared checks for router tests: a built module (FX graph of fused ops) against the
plain-PyTorch reference, forward, aux loss, stats and the gradient of every parameter.

Tests in this folder take the ``compare`` fixture (pytest runs with --import-mode=importlib,
so conftest is not importable): ``compare(spec, overrides, x, training=..., inputs=...)``
(at init and with the weights moved away from it),
``spec`` a path or a dict; ``run_both`` is the ``run_both`` fixture; ``explain_layer(path)`` the
first layer of ``moespec explain SPEC --json``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moespec
from moespec.reference import moe_layer_reference
from moespec.reference.params import buffer_names

SPECS = Path(__file__).resolve().parents[2] / "specs"


def run_both(
    spec, overrides=(), x=None, *, training: bool, inputs=None, seed: int = 3, layer=None, move=None
):
    """Build the module (then ``move(module)`` its weights, if given) and run it and the
    reference on ``x``; returns ``(module, params, (x1, y1, aux1), (x2, y2, aux2, stats2))``."""
    m = moespec.build(spec, overrides, layer=layer, seed=seed, generator=torch.Generator().manual_seed(11))
    if move is not None:
        move(m)
    m.train(training)
    full = moespec.load_spec(spec, overrides).spec
    spec_layer = full.layer_named(layer)
    buffers = buffer_names(spec_layer, full.d_model)
    params = {
        k: v.detach().clone().requires_grad_(v.is_floating_point() and k not in buffers)
        for k, v in m.state_dict().items()
    }
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = m(x1, **(inputs or {}))
    y2, aux2, stats2 = moe_layer_reference(
        x2,
        params,
        spec_layer,
        full.d_model,
        training=training,
        generator=torch.Generator().manual_seed(11),
        router_dtype=full.target.router_dtype,
        inputs=inputs,
    )
    return m, params, (x1, y1, m.aux_loss), (x2, y2, aux2, stats2)


def compare(
    spec, overrides=(), x=None, *, training: bool, inputs=None, atol=1e-5, rtol=1e-4, layer=None, away=None
):
    """Assert module == reference: output, aux loss, x's and every parameter's gradient, at
    the initial weights and then, if ``away`` is given (the fixture passes
    ``move_away_from_init``), again after ``away(module)``: bugs that only show once the
    weights have moved (a bias, a floor, a state buffer) do not hide behind the init.
    Returns the init run's ``(module, stats)``."""
    result = _compare_once(spec, overrides, x, training, inputs, atol, rtol, layer, None)
    if away is not None:
        _compare_once(spec, overrides, x, training, inputs, atol, rtol, layer, away)
    return result


def _compare_once(spec, overrides, x, training, inputs, atol, rtol, layer, move):
    m, params, (x1, y1, a1), (x2, y2, a2, stats) = run_both(
        spec, overrides, x, training=training, inputs=inputs, layer=layer, move=move
    )
    torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
    torch.testing.assert_close(a1, a2, atol=atol, rtol=rtol)
    probe = torch.linspace(-1, 1, y1.numel()).view_as(y1)
    (y1 * probe).sum().add(a1).backward()
    (y2 * probe).sum().add(a2).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    named = dict(m.named_parameters())
    assert set(named) == {k for k, v in params.items() if v.requires_grad}
    for name, p in named.items():
        ref = params[name].grad
        ref = torch.zeros_like(p) if ref is None else ref
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=name)
    return m, stats


@pytest.fixture(name="compare")
def _compare(move_away_from_init):
    return functools.partial(compare, away=move_away_from_init)


@pytest.fixture(name="run_both")
def _run_both():
    return run_both


def spec_error_text(spec, overrides=()) -> str:
    """The printed diagnostics of a spec that must fail validation."""
    with pytest.raises(moespec.SpecError) as err:
        moespec.load_spec(spec, overrides)
    return str(err.value)


def spec_diagnostics(spec, overrides=()) -> list[tuple[str, str]]:
    """``(path, message)`` of each diagnostic of a spec that must fail validation."""
    with pytest.raises(moespec.SpecError) as err:
        moespec.load_spec(spec, overrides)
    return [(d.path, d.message) for d in err.value.diagnostics]


@pytest.fixture(name="spec_error_text")
def _spec_error_text():
    return spec_error_text


@pytest.fixture(name="spec_diagnostics")
def _spec_diagnostics():
    return spec_diagnostics


def explain_layer(spec_path: str | Path) -> dict:
    """The first layer of ``moespec explain SPEC --json``, run as a user runs it (a subprocess)."""
    out = subprocess.run(
        [sys.executable, "-m", "moespec", "explain", str(spec_path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["layers"][0]


@pytest.fixture(name="explain_layer")
def _explain_layer():
    return explain_layer
