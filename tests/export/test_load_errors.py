"""`moespec.load` on broken artifacts: every problem is a clear ArtifactError, never a warning.

Edits that should reach a check behind the file hashes record the edited file's new size and
sha256 in the manifest (:func:`_record`), so the hash check does not answer first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moespec
from moespec.errors import SpecError
from moespec.export.artifact import build_artifact
from moespec.runtime.layout import ArtifactError, sha256_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "specs" / "debug-tiny.yaml"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "art"
    build_artifact(TINY, out)
    return out


@pytest.fixture
def art(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a good artifact, to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "art"))


def _record(art: Path, name: str) -> None:
    path = art / "manifest.json"
    m = json.loads(path.read_text())
    m["files"][name] = {"bytes": (art / name).stat().st_size, "sha256": sha256_file(art / name)}
    path.write_text(json.dumps(m))


def _rewrite_weights(art: Path, edit) -> None:
    from safetensors import safe_open

    path = art / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(path)
    edit(state, meta)
    save_file(state, str(path), metadata=meta)
    _record(art, "model.safetensors")


def test_loads_when_intact(art: Path):
    assert moespec.load(art).d_model == 32


@pytest.mark.parametrize("name", ["manifest.json", "spec.lock.yaml", "model.safetensors"])
def test_missing_file(art: Path, name: str):
    (art / name).unlink()
    with pytest.raises(ArtifactError, match=f"incomplete artifact, missing {name}"):
        moespec.load(art)


def test_not_a_directory(tmp_path: Path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        moespec.load(tmp_path / "nope")


def test_tampered_weight_shape(art: Path):
    def edit(state, meta):
        state["router.weight"] = torch.zeros(5, 32)
        state["experts.0.w_up"] = state["experts.0.w_up"][:, :, :16].contiguous()

    _rewrite_weights(art, edit)
    with pytest.raises(ArtifactError) as ei:
        moespec.load(art)
    msg = str(ei.value)
    assert "the weights do not match" in msg and "shape mismatches (2)" in msg
    assert "router.weight: file has [5, 32], the spec needs [4, 32]" in msg
    assert "experts.0.w_up: file has [4, 64, 16], the spec needs [4, 64, 32]" in msg


def test_missing_and_unexpected_keys_and_dtype(art: Path):
    def edit(state, meta):
        del state["experts.0.w_gate"]
        state["experts.0.w_extra"] = torch.zeros(1)
        state["router.weight"] = state["router.weight"].double()

    _rewrite_weights(art, edit)
    with pytest.raises(ArtifactError) as ei:
        moespec.load(art)
    msg = str(ei.value)
    assert "missing keys (1):\n    experts.0.w_gate" in msg
    assert "unexpected keys (1):\n    experts.0.w_extra" in msg
    assert "router.weight: file has torch.float64, the spec needs torch.float32" in msg


def test_weights_of_another_artifact(art: Path):
    _rewrite_weights(art, lambda state, meta: meta.update(spec_sha256="0" * 64, layer="late"))
    with pytest.raises(ArtifactError, match="written for another artifact: spec sha256 000000000000"):
        moespec.load(art)


def test_truncated_weights(art: Path):
    path = art / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _record(art, "model.safetensors")
    with pytest.raises(ArtifactError, match="unreadable weights file"):
        moespec.load(art)


def test_edited_lock_file(art: Path):
    lock = art / "spec.lock.yaml"
    lock.write_text(lock.read_text().replace("d_ff: 64", "d_ff: 48"))
    _record(art, "spec.lock.yaml")
    with pytest.raises(ArtifactError, match="lock file was edited"):
        moespec.load(art)


def test_lock_file_made_invalid(art: Path):
    lock = art / "spec.lock.yaml"
    lock.write_text(lock.read_text().replace("k: 2", "k: 0"))
    _record(art, "spec.lock.yaml")
    with pytest.raises(SpecError) as ei:
        moespec.load(art)
    assert "spec.lock.yaml:" in ei.value.format() and "layer.router.k" in ei.value.format()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: "{not json", "unreadable manifest"),
        (lambda m: json.dumps({**m, "format": "other"}), "not a moespec artifact manifest"),
        (lambda m: json.dumps({**m, "format_version": 99}), "format version 99 is newer"),
        (
            lambda m: json.dumps({k: v for k, v in m.items() if k != "layer"}),
            "invalid manifest.*\n  layer: missing",
        ),
        (lambda m: json.dumps({**m, "op_set": [*m["op_set"], "moespec::warp_drive"]}), "warp_drive"),
    ],
)
def test_bad_manifest(art: Path, edit, match: str):
    path = art / "manifest.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(ArtifactError, match=match):
        moespec.load(art)


def test_other_moespec_release_series_is_refused(art: Path):
    # Once logged and loaded; an error since issue 19 (the README's "never a warning").
    path = art / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "moespec_version": "0.0.1"}))
    with pytest.raises(ArtifactError, match=r"built by moespec 0\.0\.1, a release series \(0\.0\) other"):
        moespec.load(art)
