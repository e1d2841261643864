"""The public surface: ``moespec.__all__`` resolves, errors live in ``moespec.errors``, and
running controllers' state stays fp32 whatever the layer's dtype."""

from __future__ import annotations

import pytest
import torch

import moespec
from moespec import errors

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_every_public_name_resolves() -> None:
    for name in moespec.__all__:
        assert getattr(moespec, name) is not None, name
    assert callable(moespec.build) and callable(moespec.load) and callable(moespec.release_buffers)
    assert isinstance(moespec.MoELayer, type)


def test_error_types_live_in_errors() -> None:
    for name in ("MoespecError", "SpecError", "BuildError", "TargetError", "ArtifactError", "IRError"):
        cls = getattr(moespec, name)
        assert cls is getattr(errors, name) and cls.__module__ == "moespec.errors"
        assert issubclass(cls, moespec.MoespecError)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moespec.nope  # noqa: B018


def test_release_buffers_frees_the_pool() -> None:
    from moespec.ops import _buffers

    t = _buffers.empty((1 << 20,), torch.float32, torch.device("cpu"))
    del t
    moespec.release_buffers()
    assert _buffers._pooled_bytes == 0


@pytest.mark.parametrize(
    ("spec", "name", "start"),
    [("remoe.yaml", "router.l1_coeff", 1e-8), ("deepseek-v3.yaml", "router.expert_bias", 0.0)],
)
def test_controller_state_stays_fp32(spec: str, name: str, start: float) -> None:
    # Both specs are bf16; a controller's small steps would vanish in bf16 (1e-8 became 1.0012e-8).
    small = ["d_model=32", "layer.experts.routed.0.d_ff=16"]
    if spec.startswith("deepseek"):
        small += ["layer.experts.routed.0.count=8", "layer.experts.shared.d_ff=16", "layer.router.k=2",
                  "layer.router.groups.n_groups=2", "layer.router.groups.topk_groups=1"]  # fmt: skip
    layer = moespec.build(ROOT / "specs" / spec, small)
    state = layer.get_buffer(name)
    assert state.dtype == torch.float32 and torch.all(state == torch.tensor(start, dtype=torch.float32))
    assert layer.experts_dtype == torch.bfloat16  # the rest follows target.dtype
    # A value bf16 and fp16 cannot hold (1e-8 underflows fp16) survives every cast.
    with torch.no_grad():
        state.fill_(1.0001e-8)
    exact = torch.tensor(1.0001e-8, dtype=torch.float32)
    for cast in (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.float(), lambda m: m.double()):
        cast(layer)
        assert layer.get_buffer(name).dtype == torch.float32
        assert torch.all(layer.get_buffer(name) == exact)
    assert layer.experts_dtype == torch.float64
