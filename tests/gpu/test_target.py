"""``target.device: cuda`` places a layer without ``device=`` (build, and an artifact's load),
``target.arch`` is checked against the GPU, and the weights for a seed do not depend on where
(or under which default device) the layer is built."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import moespec
from moespec.errors import TargetError
from moespec.export.artifact import build_artifact
from moespec.runtime.target import ARCH_CAPABILITY


def _devices(layer: torch.nn.Module) -> set[str]:
    return {t.device.type for t in layer.state_dict().values()}


def test_target_device_places_the_layer(device, on_device, tiny_spec, assert_close_norm):
    data = tiny_spec("debug-hetero.yaml", device_type=device.type)
    layer = moespec.build(data, seed=1)  # no device=: target.device
    assert _devices(layer) == {device.type}
    cpu = moespec.build(data, seed=1, device="cpu")
    x = torch.randn(2, 5, data["d_model"], generator=torch.Generator().manual_seed(1))
    with on_device():
        y = layer.eval()(x.to(device))
    assert y.device.type == device.type
    assert_close_norm(y, cpu.eval()(x), rtol=1e-4, what="output")


def test_artifact_loads_on_the_target_device(device, on_device, tiny_spec, tmp_path: Path, assert_close_norm):
    data = tiny_spec("mixtral-8x7b.yaml", device_type=device.type)
    art = build_artifact(data, tmp_path / "art", seed=2)
    layer = moespec.load(art.path)
    assert _devices(layer) == {device.type}
    on_cpu = moespec.load(art.path, device="cpu")
    assert _devices(on_cpu) == {"cpu"}
    # The generated module.py's load() too (it needs only moespec installed).
    spec = importlib.util.spec_from_file_location("_moespec_gpu_artifact_module", art.path / "module.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        generated = module.load()
    finally:
        del sys.modules[spec.name]
    assert _devices(generated) == {device.type}
    x = torch.randn(9, data["d_model"], generator=torch.Generator().manual_seed(3))
    with on_device():
        y, y2 = layer.eval()(x.to(device)), generated.eval()(x.to(device))
    assert_close_norm(y, on_cpu.eval()(x), rtol=1e-4, what="loaded output")
    assert torch.equal(y, y2)


def test_target_arch_is_checked_on_the_gpu(device, tiny_spec):
    if device.type != "cuda":
        pytest.skip("target.arch is checked on CUDA devices only")
    have = torch.cuda.get_device_capability(device)
    data = tiny_spec("debug-tiny.yaml", device_type="cuda")
    matching = [a for a, cap in ARCH_CAPABILITY.items() if cap == tuple(have)]
    for arch in matching:
        layer = moespec.build({**data, "target": {**data["target"], "arch": arch}})
        assert _devices(layer) == {"cuda"}
    other = next(a for a, cap in ARCH_CAPABILITY.items() if cap != tuple(have))
    with pytest.raises(TargetError, match=r"^target\.arch: "):
        moespec.build({**data, "target": {**data["target"], "arch": other}})


@pytest.mark.parametrize("name", ["debug-hetero.yaml", "hash-layers.yaml", "x-moe.yaml"])
def test_weights_do_not_depend_on_the_default_device(name, device, tiny_spec, request):
    """Weights are drawn on the CPU whatever the device, so a layer built inside
    ``with torch.device(...)`` (a common way to build a model on the GPU) gets the same
    weights as anywhere else, and lands where it was asked to."""
    data = tiny_spec(name)
    want = moespec.build(data, seed=5, device="cpu").state_dict()
    with torch.device(device):
        layer = moespec.build(data, seed=5, device=device)
    got = layer.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].device.type == device.type, k
        assert torch.equal(got[k].cpu(), v), f"{k} differs when built under torch.device({device})"
