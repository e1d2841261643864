"""`kind: custom`: a user function as router, FX module vs reference, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"
TINY = str(SPECS / "debug-tiny.yaml")
EX = "moespec.examples.custom_router"
TOPK = f"layer.router={{kind: custom, function: '{EX}:softmax_topk', output: topk, k: 2, options: {{k: 2}}}}"
DENSE = f"layer.router={{kind: custom, function: '{EX}:above_uniform', output: dense, k: 2}}"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_topk_custom_matches_reference(compare, t, training):
    x = torch.randn(t, 32, generator=torch.Generator().manual_seed(t))
    compare(TINY, (TOPK,), x, training=training)


@pytest.mark.parametrize("training", [True, False])
def test_dense_custom_matches_reference(compare, training):
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    compare(TINY, (DENSE, "layer.losses={load_balance: {kind: switch, weight: 0.01}}"), x, training=training)


def test_custom_equals_builtin_topk():
    """softmax_topk is the math of `kind: topk, order: topk_then_softmax`: same module output."""
    over = ("layer.router.order=topk_then_softmax", "~layer.router.renormalize")
    builtin = moespec.build(TINY, over, seed=4)
    custom = moespec.build(TINY, (TOPK,), seed=4)
    custom.load_state_dict(builtin.state_dict())
    x = torch.randn(16, 32)
    torch.testing.assert_close(custom(x), builtin(x))
    torch.testing.assert_close(custom.router_logits, builtin.router_logits)


def test_dense_custom_selects_variable_counts():
    m = moespec.build(TINY, (DENSE,))
    with torch.no_grad():
        m.router.weight.zero_()  # uniform probabilities: nothing exceeds 1/E, no expert runs
    y = m(torch.randn(5, 32))
    assert torch.count_nonzero(y) == 0
    assert int(m.routing_stats["tokens_per_expert"].sum()) == 0


def test_generated_code_names_the_function():
    m = moespec.build(TINY, (TOPK,))
    code = m.graph_module.code
    assert "softmax_topk" in code and "check_custom" in code


def _errors(router: str, *extra: str) -> str:
    with pytest.raises(moespec.SpecError) as err:
        moespec.load_spec(TINY, (f"layer.router={router}", *extra))
    return str(err.value)


def test_unimportable_function_is_a_located_error():
    msg = _errors("{kind: custom, function: 'no_such_pkg.mod:fn', output: topk, k: 1}")
    assert "layer.router.function" in msg and "cannot import no_such_pkg.mod:fn" in msg
    assert "ModuleNotFoundError" in msg


def test_bad_options_and_path_and_k():
    bad = f"{{kind: custom, function: '{EX}:softmax_topk', output: topk, k: 9, options: {{bogus: 1}}}}"
    msg = _errors(bad)
    assert "k=9 exceeds the number of routed experts (4)" in msg
    assert "cannot be called as fn(x_TD, weight_ED, **options)" in msg
    assert "function" in _errors("{kind: custom, function: 'not a path', output: topk, k: 1}")


def test_dense_custom_needs_dropless():
    msg = _errors(
        f"{{kind: custom, function: '{EX}:above_uniform', output: dense, k: 2}}",
        "layer.capacity={kind: factor, train_factor: 1.0, eval_factor: 1.0}",
    )
    assert "layer.capacity" in msg and "needs capacity: dropless" in msg


def test_wrong_return_shape_is_a_clear_error():
    m = moespec.build(TINY, (TOPK.replace("options: {k: 2}", "options: {k: 3}"),))
    with pytest.raises(ValueError, match=r"weight_TK has shape \(4, 3\), expected \(4, 2\)"):
        m(torch.randn(4, 32))


def test_dense_routing_compiles_with_inductor():
    """A data-dependent number of rows (sort_selected's unbacked size) through inductor,
    forward and backward, equals eager."""
    m = moespec.build(TINY, (DENSE,), seed=2)
    x = torch.randn(12, 32)
    compiled = torch.compile(m, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = compiled(x1)
    y2 = m(x2)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)
