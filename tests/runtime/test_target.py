"""target.device / backend / arch and placement.expert_parallel are honoured or refused, never
ignored: validate, explain and artifact writing describe the target; a live module checks it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import moespec
from moespec.cli import main
from moespec.errors import BuildError, MoespecError, TargetError
from moespec.export.artifact import build_artifact
from moespec.ir.build import build_program
from moespec.runtime.target import EP_RANKS_ATTR, check_runnable
from moespec.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "specs" / "debug-tiny.yaml")
# debug-tiny.yaml has no target or placement section: `+` adds them.
CUDA = ("+target.device=cuda",)
TRITON = ("+target={backend: triton, device: cuda}",)
EP2 = ("+placement.expert_parallel=2",)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has no CUDA device, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A CUDA device of the compute capability the test sets (default 8.0, an A100)."""
    cap = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    return cap


def _program(*overrides: str):
    return build_program(load_spec(TINY, overrides).spec)


def test_error_type_and_text():
    err = TargetError("target.device", "cuda, but no")
    assert isinstance(err, BuildError) and isinstance(err, MoespecError)
    assert err.path == "target.device" and str(err) == "target.device: cuda, but no"
    assert moespec.BuildError is BuildError  # still importable from the API


def test_cuda_target_without_cuda_fails_clearly_on_build(no_cuda):
    with pytest.raises(TargetError, match=r"^target\.device: cuda, but this machine has no CUDA") as e:
        moespec.build(TINY, CUDA)
    assert "moespec build SPEC -o DIR" in str(e.value) and "device=" in str(e.value)
    # An explicit device overrides target.device.
    assert moespec.build(TINY, CUDA, device="cpu").experts_dtype == torch.float32


def test_cuda_artifact_is_written_without_cuda_and_loads_only_where_asked(no_cuda, tmp_path: Path):
    art = build_artifact(TINY, tmp_path / "art", CUDA, seed=1)
    assert art.manifest["target"]["device"] == "cuda"
    with pytest.raises(TargetError, match=r"^target\.device: cuda"):
        moespec.load(art.path)
    with pytest.raises(BuildError, match="cannot use device cuda: this machine has no CUDA device"):
        moespec.load(art.path, device="cuda")
    layer = moespec.load(art.path, device="cpu")
    ref = moespec.build(TINY, seed=1)  # same weights as a CPU build of the same seed
    for (k, a), (_, b) in zip(layer.state_dict().items(), ref.state_dict().items(), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), k
    # The artifact's standalone module.py behaves the same.
    spec = importlib.util.spec_from_file_location("moe_cuda_art", art.path / "module.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(TargetError, match=r"^target\.device: cuda"):
        mod.load()
    assert torch.equal(mod.load("cpu").experts.get_submodule("0").w_up, ref.experts.get_submodule("0").w_up)


def test_cli_describes_cuda_targets_and_refuses_to_run_them(no_cuda, capsys, tmp_path: Path):
    for cmd in (
        ["validate", TINY, *CUDA],
        ["explain", TINY, *CUDA],
        ["build", TINY, *CUDA, "-o", str(tmp_path / "a")],
    ):
        assert main(cmd) == 0, cmd
    capsys.readouterr()
    assert main(["bench", TINY, *CUDA, "--tokens", "4", "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moespec: error: target.device: cuda, but") and "Traceback" not in err
    assert main(["bench", TINY, *CUDA, "--device", "cpu", "--tokens", "4", "--repeat", "1", "--json"]) == 0
    assert (
        main(["bench", str(tmp_path / "a"), "--device", "cpu", "--tokens", "4", "--repeat", "1", "--json"])
        == 0
    )


def test_triton_runs_only_where_its_kernels_can(no_cuda, capsys, tmp_path: Path):
    """Without a GPU (and without Triton's interpreter) a triton target validates, is explained
    and written as an artifact with its kernels, and every live module is refused: no torch
    kernels stand in for it."""
    assert main(["validate", TINY, *TRITON]) == 0
    assert main(["explain", TINY, *TRITON, "--json"]) == 0
    capsys.readouterr()
    with pytest.raises(TargetError, match=r"^target\.device: cuda, but this machine has no CUDA"):
        moespec.build(TINY, TRITON)
    with pytest.raises(
        TargetError, match=r"^target\.backend: triton, but the tensors are on the CPU.*TRITON_INTERPRET"
    ):
        moespec.build(TINY, TRITON, device="cpu")  # an explicit device does not make Triton kernels
    out = tmp_path / "art"
    assert main(["build", TINY, *TRITON, "-o", str(out)]) == 0
    kernels = sorted(p.name for p in (out / "kernels").iterdir())
    assert len(kernels) == 7 and kernels[-1].startswith("topk_route__"), kernels
    with pytest.raises(TargetError, match=r"^target\.device: cuda"):
        moespec.load(out)
    with pytest.raises(TargetError, match=r"^target\.backend: triton"):
        moespec.load(out, device="cpu")


def test_arch_is_checked_against_the_gpu(fake_gpu):
    program = _program(*CUDA, "+target.arch=sm90")
    with pytest.raises(
        TargetError, match=r"^target\.arch: sm90 \(compute capability 9\.0\), but cuda is sm80"
    ):
        check_runnable(program)
    with pytest.raises(TargetError, match=r"^target\.arch"):
        moespec.build(TINY, (*CUDA, "+target.arch=sm90"))
    fake_gpu["value"] = (9, 0)
    assert check_runnable(program) == torch.device("cuda")
    assert check_runnable(_program(*CUDA, "+target.arch=auto")) == torch.device("cuda")
    # On an explicit CPU device the GPU architecture does not apply.
    fake_gpu["value"] = (8, 6)
    assert check_runnable(program, "cpu") == torch.device("cpu")


def test_arch_without_cuda_names_the_device(no_cuda):
    with pytest.raises(TargetError, match=r"^target\.device"):
        check_runnable(_program(*CUDA, "+target.arch=sm90"))


def test_bad_explicit_device():
    with pytest.raises(BuildError, match="unknown device 'gpu0'"):
        moespec.build(TINY, device="gpu0")


def test_expert_parallel_runs_only_over_a_matching_mesh(capsys, tmp_path: Path):
    for cmd in (
        ["validate", TINY, *EP2],
        ["explain", TINY, *EP2],
        ["build", TINY, *EP2, "-o", str(tmp_path / "a")],
    ):
        assert main(cmd) == 0, cmd
    layer = moespec.build(TINY, EP2)
    x = torch.randn(3, 32)
    with pytest.raises(TargetError, match=r"^placement\.expert_parallel: 2, but layer 'layer' runs without"):
        layer(x)
    setattr(layer, EP_RANKS_ATTR, 4)
    with pytest.raises(TargetError, match="over an expert-parallel mesh of 4"):
        layer(x)
    # The attribute expert parallelism sets once the layer's experts are spread over 2 ranks.
    setattr(layer, EP_RANKS_ATTR, 2)
    assert layer(x).shape == x.shape
    single = moespec.build(TINY)
    assert single(x).shape == x.shape


@needs_cuda
def test_cuda_target_builds_on_the_gpu(tmp_path: Path):
    layer = moespec.build(TINY, CUDA, seed=1)
    assert {p.device.type for p in layer.parameters()} == {"cuda"}
    cpu = moespec.build(TINY, seed=1).eval()
    x = torch.randn(5, 32)
    y = layer.eval()(x.cuda())
    torch.testing.assert_close(y.cpu(), cpu(x), rtol=1e-4, atol=1e-5)
    art = build_artifact(TINY, tmp_path / "art", CUDA, seed=1)
    loaded = moespec.load(art.path)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
