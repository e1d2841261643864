"""Sizes that cannot build are invalid specs: every tensor's element count fits in an int64
(issue 19, section 4), so ``validate`` catches them and ``build`` never overflows."""

from __future__ import annotations

from pathlib import Path

import pytest

from moespec.cli import main
from moespec.errors import SpecError
from moespec.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "specs" / "debug-tiny.yaml")
HASH = str(ROOT / "specs" / "hash-layers.yaml")
HUGE = "99999999999999999999999"


def _problems(spec: str, *overrides: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as e:
        load_spec(spec, list(overrides))
    return [(d.path, d.message) for d in e.value.diagnostics]


def test_the_largest_field_is_blamed() -> None:
    ((path, message),) = _problems(TINY, f"layer.experts.routed.0.count={HUGE}")
    assert path == "layer.experts.routed.0.count"
    assert message.startswith(f"count={HUGE} makes experts.0.w_up 2.05e+26 elements")
    ((path, _),) = _problems(TINY, f"layer.experts.routed.0.d_ff={HUGE}")
    assert path == "layer.experts.routed.0.d_ff"


def test_the_limit_itself_is_allowed() -> None:
    fits = [f"layer.router.vocab_size={2**63 - 1}", "layer.router.k=1"]
    assert load_spec(HASH, fits).spec.layer.router.vocab_size == 2**63 - 1
    ((path, _),) = _problems(HASH, f"layer.router.vocab_size={2**63}", "layer.router.k=1")
    assert path == "layer.router.vocab_size"


@pytest.mark.parametrize("command", ["validate", "explain", "build"])
def test_no_command_overflows(command: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra = ["-o", str(tmp_path / "out")] if command == "build" else []
    assert main([command, TINY, f"d_model={HUGE}", *extra]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Overflow" not in err
    assert f"d_model: d_model={HUGE} makes experts.0.w_up" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_checked_tensors_are_the_layers_tensors(path: Path) -> None:
    # spec/ may not import the IR's parameter table: the check mirrors it; keep them in step.
    from moespec.ir.params import layer_params
    from moespec.spec.validate import _tensors

    spec = load_spec(path).spec
    for at, layer in [
        (("layer",), spec.layer),
        *((("groups", i, "layer"), g.layer) for i, g in enumerate(spec.groups)),
    ]:
        table = {(p.name, p.shape) for p in layer_params(layer, spec.d_model)}
        checked = {(name, shape) for name, shape, _ in _tensors(spec, layer, at)}
        assert checked <= table
