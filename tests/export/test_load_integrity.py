"""``moespec.load`` never loads wrong weights silently: the files it reads must have the size
and sha256 the manifest records (``moespec/runtime/manifest.py: verify_files``), and the one
opt-out, ``verify=False``, says what it skipped. The artifact's ``module.py`` runs the same checks.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import moespec

SPEC: dict[str, Any] = {
    "moespec": 1,
    "name": "integrity",
    "d_model": 8,
    "layer": {
        "experts": {"routed": [{"count": 2, "kind": "glu", "activation": "silu", "d_ff": 4}]},
        "router": {"kind": "topk", "k": 1},
    },
}
WEIGHTS = "model.safetensors"
LOCK = "spec.lock.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two artifacts of the same spec, seeds 0 and 1: same shapes, same metadata, other weights."""
    root = tmp_path_factory.mktemp("built")
    for seed in (0, 1):
        moespec.build_artifact(SPEC, root / f"seed{seed}", seed=seed)
    return {seed: root / f"seed{seed}" for seed in (0, 1)}


@pytest.fixture
def art(built: dict[int, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "art"))


def recorded(art: Path, name: str) -> dict[str, Any]:
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))["files"][name]


def mismatch(art: Path, *problems: str) -> str:
    return (
        f"{art}: files differ from what manifest.json records (changed or replaced since the build)\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nRebuild the artifact with `moespec build`; to load files edited on purpose, pass "
        "verify=False to moespec.load"
    )


def load_error(art: Path, **kwargs: Any) -> str:
    with pytest.raises(moespec.ArtifactError) as ei:
        moespec.load(art, **kwargs)
    return str(ei.value)


def sha_problem(art: Path, name: str, actual: Path) -> str:
    from moespec.runtime.layout import sha256_file

    want = recorded(art, name)["sha256"]
    return f"{name}: sha256 {sha256_file(actual)[:12]}..., the manifest records {want[:12]}..."


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_bit_in_the_weights(art: Path) -> None:
    path = art / WEIGHTS
    flip_bit(path, path.stat().st_size - 3)  # inside the last tensor's data: still a valid file
    assert load_file(path)  # safetensors alone would not notice
    assert load_error(art) == mismatch(art, sha_problem(art, WEIGHTS, path))


def test_weights_of_another_seed(art: Path, built: dict[int, Path]) -> None:
    shutil.copyfile(built[1] / WEIGHTS, art / WEIGHTS)
    assert load_error(art) == mismatch(art, sha_problem(art, WEIGHTS, built[1] / WEIGHTS))


def test_weights_symlinked_to_another_seed(art: Path, built: dict[int, Path]) -> None:
    (art / WEIGHTS).unlink()
    (art / WEIGHTS).symlink_to(built[1] / WEIGHTS)
    assert load_error(art) == mismatch(art, sha_problem(art, WEIGHTS, built[1] / WEIGHTS))


def test_symlink_to_identical_bytes_loads(art: Path, built: dict[int, Path]) -> None:
    # What is checked is the bytes load reads, not how the file got there.
    (art / WEIGHTS).unlink()
    (art / WEIGHTS).symlink_to(built[0] / WEIGHTS)
    assert moespec.load(art).d_model == 8


def test_truncated_weights_are_caught_by_size(art: Path) -> None:
    path = art / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    want = recorded(art, WEIGHTS)["bytes"]
    assert load_error(art) == mismatch(art, f"{WEIGHTS}: 100 bytes, the manifest records {want}")


def test_edited_lock_file_is_caught_by_hash(art: Path) -> None:
    path = art / LOCK
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("# Generated", "# generated", 1), encoding="utf-8")  # a comment only
    assert load_error(art) == mismatch(art, sha_problem(art, LOCK, path))


def test_both_files_are_listed(art: Path, built: dict[int, Path]) -> None:
    flip_bit(art / LOCK, 0)
    shutil.copyfile(built[1] / WEIGHTS, art / WEIGHTS)
    assert load_error(art) == mismatch(
        art, sha_problem(art, LOCK, art / LOCK), sha_problem(art, WEIGHTS, art / WEIGHTS)
    )


def test_no_record_of_a_file(art: Path) -> None:
    path = art / "manifest.json"
    m = json.loads(path.read_text(encoding="utf-8"))
    del m["files"][WEIGHTS]
    path.write_text(json.dumps(m), encoding="utf-8")
    assert load_error(art) == mismatch(art, f"{WEIGHTS}: no size and sha256 recorded in manifest.json")


def test_weights_replaced_between_hash_and_read(
    art: Path, built: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hash, then read: a file swapped in after its hash was checked is caught after the read.
    from moespec.runtime import load as load_module

    read_weights = load_module.read_weights

    def swap_then_read(path: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
        shutil.copyfile(built[1] / WEIGHTS, art / "new")
        (art / "new").replace(path)
        return read_weights(path, **kwargs)

    monkeypatch.setattr(load_module, "read_weights", swap_then_read)
    assert load_error(art) == (
        f"{art}: model.safetensors changed while the artifact was being loaded (after its sha256 "
        "was checked); load it again once nothing writes to it"
    )


# --- the opt-out -------------------------------------------------------------------------------


def test_verify_false_loads_edited_weights_and_says_so(
    art: Path, built: dict[int, Path], caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copyfile(built[1] / WEIGHTS, art / WEIGHTS)
    with caplog.at_level(logging.WARNING):
        layer = moespec.load(art, verify=False)
    assert caplog.messages == [
        f"{art}: verify=False: not comparing the sizes and sha256 of spec.lock.yaml and "
        "model.safetensors with manifest.json; they load as they are (every other check still runs)"
    ]
    assert torch.equal(layer.state_dict()["router.weight"], load_file(built[1] / WEIGHTS)["router.weight"])


def test_verify_false_keeps_the_other_checks(art: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = art / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert "unreadable weights file" in load_error(art, verify=False)
    assert len(caplog.messages) == 1 and "verify=False" in caplog.messages[0]


# --- module.py ---------------------------------------------------------------------------------


def import_module_py(art: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"moe_art_{id(art)}", art / "module.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_py_loads_an_intact_artifact(art: Path) -> None:
    assert import_module_py(art).load().d_model == 8


def test_module_py_refuses_tampered_weights(art: Path, built: dict[int, Path]) -> None:
    shutil.copyfile(built[1] / WEIGHTS, art / WEIGHTS)
    mod = import_module_py(art)
    with pytest.raises(moespec.ArtifactError) as ei:
        mod.load()
    assert str(ei.value) == mismatch(art, sha_problem(art, WEIGHTS, built[1] / WEIGHTS))
    assert mod.load(verify=False).d_model == 8


def test_module_py_refuses_another_artifacts_directory(art: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    moespec.build_artifact({**SPEC, "name": "other"}, other)
    shutil.copyfile(art / "module.py", other / "module.py")
    mod = import_module_py(other)
    with pytest.raises(moespec.ArtifactError) as ei:
        mod.load()
    ours, theirs = (json.loads((d / "manifest.json").read_text())["spec_sha256"] for d in (art, other))
    assert str(ei.value) == (
        f"{other}: this module.py was generated for spec sha256 {ours[:12]}..., layer 'layer', but "
        f"the directory's manifest names {theirs[:12]}..., layer 'layer'; use the module.py of the "
        "same artifact"
    )
