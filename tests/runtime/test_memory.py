"""Builds and benchmarks that know their size (issue 19 §2): the estimate from the IR, the
refusal before anything is allocated (with a fake small memory), and the explicit way out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import moespec
from moespec.cli import main
from moespec.ir.build import build_program
from moespec.runtime import memory

ROOT = Path(__file__).resolve().parents[2]
REMOE = ROOT / "specs" / "remoe.yaml"
SMALL = ["d_model=32", "layer.experts.routed.0.d_ff=16"]


@pytest.fixture
def tiny_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    have = 16 * 1024  # 16 KiB: below any layer here (the small ReMoE layer takes 41 KB)
    monkeypatch.setattr(memory, "available_bytes", lambda: have)
    return have


def test_weight_bytes_is_what_the_layer_holds() -> None:
    layer = moespec.build(REMOE, SMALL)  # bf16 weights, an fp32 controller
    held = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    largest = max(math.prod(p.shape) for p in layer.ir.params)
    assert memory.weight_bytes(layer.ir) == held + 4 * largest


def test_a_layer_too_large_is_refused_before_allocating(tiny_memory: int) -> None:
    with pytest.raises(moespec.BuildError, match=r"needs about .* GiB of memory, but this machine has") as ei:
        moespec.build(REMOE, SMALL)
    assert "d_model=..." in str(ei.value) and "allow_large=True (`--allow-large`)" in str(ei.value)
    assert isinstance(moespec.build(REMOE, SMALL, allow_large=True), moespec.MoELayer)


def test_the_artifact_writer_and_loader_check_too(tiny_memory: int, tmp_path: Path) -> None:
    out = tmp_path / "art"
    assert main(["build", str(REMOE), *SMALL, "-o", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written
    assert main(["build", str(REMOE), *SMALL, "-o", str(out), "--allow-large"]) == 0
    with pytest.raises(moespec.BuildError, match="needs about"):
        moespec.load(out)
    assert isinstance(moespec.load(out, allow_large=True), moespec.MoELayer)


def test_bench_refuses_tokens_that_do_not_fit(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    ir = build_program(moespec.load_spec(REMOE, SMALL).spec).layers[0]
    need = memory.activation_bytes(ir, 10**8)
    monkeypatch.setattr(memory, "available_bytes", lambda: need // 4)
    assert main(["bench", str(REMOE), *SMALL, "--tokens", str(10**8)]) == 1
    err = capsys.readouterr().err
    assert "benchmarking 100000000 tokens needs about" in err and "use fewer --tokens" in err


def test_famous_specs_say_what_they_need() -> None:
    # DeepSeek-V3's layer (bf16) holds 21 GiB of weights; its largest tensor drawn in fp32 adds
    # 14 GiB: the estimate says so instead of the OOM killer.
    ir = build_program(moespec.load_spec(ROOT / "specs" / "deepseek-v3.yaml").spec).layers[0]
    assert 34 * 2**30 < memory.weight_bytes(ir) < 36 * 2**30


def test_available_bytes_reads_this_machine() -> None:
    have = memory.available_bytes()
    assert have is None or have > 0


@pytest.mark.parametrize(
    ("spec", "overrides"),
    [
        (REMOE, SMALL),  # bf16 weights, an fp32 controller
        (
            ROOT / "specs" / "hash-layers.yaml",
            ["d_model=32", "layer.experts.routed.0.d_ff=16", "layer.router.vocab_size=64"],
        ),  # an int64 table
        (ROOT / "specs" / "smoe-dropout.yaml", ["d_model=32", "layer.experts.routed.0.d_ff=16"]),  # schedules
    ],
)
def test_meta_build_writes_the_same_weights(tmp_path: Path, spec: Path, overrides: list[str]) -> None:
    # `--meta` draws, writes and frees one tensor at a time: the file holds the same tensors.
    from safetensors.torch import load_file

    held, streamed = tmp_path / "held", tmp_path / "streamed"
    assert main(["build", str(spec), *overrides, "-o", str(held), "--seed", "5"]) == 0
    assert main(["build", str(spec), *overrides, "-o", str(streamed), "--seed", "5", "--meta"]) == 0
    a, b = load_file(held / "model.safetensors"), load_file(streamed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (held / "report.json").read_text() == (streamed / "report.json").read_text()
    assert moespec.load(streamed).state_dict().keys() == a.keys()  # loads: hashes and checks pass


def test_deepseek_fits_a_24_gib_machine_only_with_meta() -> None:
    ir = build_program(moespec.load_spec(ROOT / "specs" / "deepseek-v3.yaml").spec).layers[0]
    assert memory.weight_bytes(ir) > 0.9 * 24 * 2**30 > memory.weight_bytes(ir, meta=True)
