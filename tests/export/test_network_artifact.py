"""Artifacts of whole networks: `moespec build` of a spec with `model:` writes the network
(manifest layer "<model>"), `moespec.load` and the generated module.py read it back with every
check, and `--layer` still writes one MoE layer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import moespec
from moespec.cli import main
from moespec.errors import ArtifactError, BuildError
from moespec.export.artifact import build_artifact
from moespec.runtime.layer import MoELayer
from moespec.runtime.network import MoENetwork, param_count

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tiny-decoder.yaml"
SMALL = ["d_model=32", "model.blocks=2", "layer.experts.routed.0.d_ff=32", "model.dense_ffn.d_ff=32"]


def test_network_artifact_round_trip(tmp_path: Path):
    out = tmp_path / "net"
    art = build_artifact(SPEC, out, SMALL, seed=3)
    assert art.manifest["layer"] == "<model>"
    built = moespec.build(SPEC, SMALL, seed=3)
    loaded = moespec.load(out)
    assert isinstance(loaded, MoENetwork)
    a, b = built.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(built.eval()(ids).logits, loaded.eval()(ids).logits)
    report = json.loads((out / "report.json").read_text())
    assert report["numbers"]["params_total"] == param_count(loaded)
    assert report["custom_ops"] and all(o.startswith("torch.ops.moespec.") for o in report["custom_ops"])
    # The standalone module.py loads the same network.
    spec = importlib.util.spec_from_file_location("net_module", out / "module.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert torch.equal(mod.load().eval()(ids).logits, loaded(ids).logits)


def test_network_artifact_checks(tmp_path: Path, capsys):
    out = tmp_path / "net"
    assert main(["build", str(SPEC), *SMALL, "-o", str(out)]) == 0
    assert "whole model (decoder_lm, 2 blocks, 1 MoE)" in capsys.readouterr().out
    with pytest.raises(BuildError, match="--meta"):
        build_artifact(SPEC, tmp_path / "meta", SMALL, meta=True)
    assert main(["bench", str(out), "--tokens", "8", "--repeat", "1"]) == 1
    assert "holds a network" in capsys.readouterr().err
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match=r"sha256|size"):
        moespec.load(out)
    layer_out = tmp_path / "layer"
    build_artifact(SPEC, layer_out, SMALL, layer="layer")
    assert isinstance(moespec.load(layer_out), MoELayer)


def test_triton_network_artifact_holds_every_designs_kernels(tmp_path: Path, monkeypatch):
    """A triton network's artifact has kernels/ with the kernels of each MoE design it uses
    (here a SwiGLU design and a GELU-MLP group: both sets), written on a machine without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    groups = (
        "+groups=[{name: a, count: 1, layer: {}}, {name: b, count: 1, layer: {experts: {routed: "
        "[{count: 4, kind: mlp, activation: gelu, d_ff: 32}]}}}]"
    )
    out = tmp_path / "net"
    triton = "+target={backend: triton, device: cuda}"
    art = build_artifact(SPEC, out, [*SMALL, "model.blocks=3", triton, groups])
    kernels = sorted(p.name for p in (out / "kernels").iterdir())
    assert {k.split("__")[1] for k in kernels} == {
        "silu-glu-nobias-fp32.py",
        "gelu-mlp-nobias-fp32.py",
        "softmax-softmax_then_topk-renorm-max.py",
    }, kernels
    assert all(f"kernels/{k}" in art.manifest["files"] for k in kernels)
    assert "moespec" in (out / "kernels" / kernels[0]).read_text().splitlines()[0]
