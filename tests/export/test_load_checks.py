"""Each check of ``moespec.load`` alone: break exactly one thing in a fresh artifact and
expect that check's exact message (``moespec/runtime/load.py`` and the manifest reader in
``moespec/runtime/layout.py``).

A test that breaks two things at once and matches the first message lets the second check
go missing unnoticed; here every artifact differs from a good one in a single respect. A test
that edits ``spec.lock.yaml`` or ``model.safetensors`` to reach a later check records the edited
file's new size and sha256 in the manifest (:func:`record`), as a consistent forgery would, so
the hash check (``tests/export/test_load_integrity.py``) does not answer first.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moespec
from moespec.runtime.layout import sha256_file

# Two groups of identical shapes: the weights of one fit the other but for their metadata.
SPEC: dict[str, Any] = {
    "moespec": 1,
    "name": "load-checks",
    "d_model": 8,
    "layer": {
        "experts": {"routed": [{"count": 2, "kind": "glu", "activation": "silu", "d_ff": 4}]},
        "router": {"kind": "topk", "k": 1},
    },
    "groups": [
        {"name": "early", "layer": {}},
        {"name": "late", "layer": {"router": {"temperature": 2.0}}},
    ],
}

Edit = Callable[[dict[str, torch.Tensor], dict[str, str]], None]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("built")
    out = {}
    for layer in ("early", "late"):
        out[layer] = root / layer
        moespec.build_artifact(SPEC, out[layer], layer=layer)
    return out


@pytest.fixture
def art(built: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the good `early` artifact, to break in one respect."""
    return Path(shutil.copytree(built["early"], tmp_path / "art"))


def manifest(art: Path) -> dict[str, Any]:
    return json.loads((art / "manifest.json").read_text(encoding="utf-8"))


def write_manifest(art: Path, data: Any) -> None:
    (art / "manifest.json").write_text(json.dumps(data), encoding="utf-8")


def record(art: Path, name: str) -> None:
    """Record file ``name``'s current size and sha256 in the manifest (a consistent edit)."""
    m = manifest(art)
    m["files"][name] = {"bytes": (art / name).stat().st_size, "sha256": sha256_file(art / name)}
    write_manifest(art, m)


def rewrite_weights(art: Path, edit: Edit) -> None:
    """Rewrite model.safetensors after ``edit(tensors, metadata)`` changed them in place, and
    record its new hash."""
    path = art / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    state = load_file(path)
    edit(state, meta)
    save_file(state, str(path), metadata=meta)
    record(art, "model.safetensors")


def load_error(art: Path) -> str:
    with pytest.raises(moespec.ArtifactError) as ei:
        moespec.load(art)
    return str(ei.value)


def test_intact_artifact_loads(art: Path) -> None:
    assert moespec.load(art).d_model == 8


# --- the manifest (moespec/runtime/layout.py: read_manifest) ---------------------------------


def test_not_a_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert (
        load_error(missing)
        == f"{missing}: not an artifact directory (it does not exist or is not a directory)"
    )


def test_a_file_is_not_a_directory(art: Path) -> None:
    path = art / "manifest.json"
    assert load_error(path) == f"{path}: not an artifact directory (it does not exist or is not a directory)"


@pytest.mark.parametrize("name", ["manifest.json", "spec.lock.yaml", "model.safetensors"])
def test_missing_file(art: Path, name: str) -> None:
    (art / name).unlink()
    assert load_error(art) == f"{art}: incomplete artifact, missing {name} (rebuild it with `moespec build`)"


def test_optional_files_are_not_needed(art: Path) -> None:
    for name in ("module.py", "report.json", "report.txt", "ir.txt", "graph.txt"):
        (art / name).unlink(missing_ok=True)
    assert moespec.load(art).d_model == 8


def test_manifest_not_json(art: Path) -> None:
    text = "{not json"
    (art / "manifest.json").write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as why:
        json.loads(text)
    assert load_error(art) == f"{art / 'manifest.json'}: unreadable manifest ({why.value})"


def test_manifest_not_utf8(art: Path) -> None:
    data = b'{"format": "\xff"}'
    (art / "manifest.json").write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as why:
        data.decode("utf-8")
    assert load_error(art) == f"{art / 'manifest.json'}: unreadable manifest ({why.value})"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: [m], id="a list"),
        pytest.param(lambda m: {**m, "format": "other"}, id="other format"),
        pytest.param(lambda m: {k: v for k, v in m.items() if k != "format"}, id="no format"),
    ],
)
def test_not_a_manifest(art: Path, edit: Callable[[dict], Any]) -> None:
    write_manifest(art, edit(manifest(art)))
    expected = (
        f"{art / 'manifest.json'}: not a moespec artifact manifest (expected format 'moespec-artifact')"
    )
    assert load_error(art) == expected


def _invalid(art: Path, *problems: str) -> str:
    n = len(problems)
    return (
        f"{art / 'manifest.json'}: invalid manifest ({n} problem{'s' if n > 1 else ''}; rebuild the "
        "artifact with `moespec build`)\n" + "\n".join(f"  {p}" for p in problems)
    )


def test_newer_format_version(art: Path) -> None:
    write_manifest(art, {**manifest(art), "format_version": 2})
    assert load_error(art) == (
        f"{art / 'manifest.json'}: artifact format version 2 is newer than this moespec reads (1); "
        "upgrade moespec"
    )


def test_older_format_version(art: Path) -> None:
    write_manifest(art, {**manifest(art), "format_version": 0})
    assert load_error(art) == (
        f"{art / 'manifest.json'}: artifact format version 0 is older than this moespec reads (1); "
        "rebuild it from its spec.lock.yaml with `moespec build`"
    )


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("format_version", "1", "input should be a valid integer, got '1'"),
        ("format_version", "x", "input should be a valid integer, got 'x'"),
        ("format_version", None, "input should be a valid integer, got None"),
        ("format_version", True, "input should be a valid integer, got True"),
        ("format_version", 1.0, "input should be a valid integer, got 1.0"),
        ("seed", "abc", "input should be a valid integer, got 'abc'"),
        ("seed", -1, "input should be greater than or equal to 0, got -1"),
        ("layer", "", "string should have at least 1 character, got ''"),
        ("layer", 3, "input should be a valid string, got 3"),
        ("op_set", "moespec::x", "input should be a valid list, got 'moespec::x'"),
        ("spec_sha256", "ABC", "expected 64 lowercase hex digits, got 'ABC'"),
        ("moespec_version", "new", "expected a version MAJOR.MINOR[.PATCH...], got 'new'"),
        ("files", ["model.safetensors"], "input should be a valid dictionary, got ['model.safetensors']"),
        ("target", "cpu", "input should be a valid dictionary, got 'cpu'"),
    ],
)
def test_manifest_field_of_the_wrong_type(art: Path, key: str, value: Any, problem: str) -> None:
    write_manifest(art, {**manifest(art), key: value})
    assert load_error(art) == _invalid(art, f"{key}: {problem}")


def test_manifest_file_entry_of_the_wrong_type(art: Path) -> None:
    m = manifest(art)
    m["files"]["model.safetensors"] = {"bytes": "12", "sha256": "0" * 64, "mtime": 0}
    write_manifest(art, m)
    assert load_error(art) == _invalid(
        art,
        "files.model.safetensors.bytes: input should be a valid integer, got '12'",
        "files.model.safetensors.mtime: extra inputs are not permitted, got 0",
    )


def test_every_wrong_field_is_listed(art: Path) -> None:
    write_manifest(art, {**manifest(art), "seed": "abc", "format_version": "x"})
    assert load_error(art) == _invalid(
        art,
        "format_version: input should be a valid integer, got 'x'",
        "seed: input should be a valid integer, got 'abc'",
    )


def test_unknown_manifest_fields_are_kept(art: Path) -> None:
    write_manifest(art, {**manifest(art), "note": "fine-tuned on my data"})
    assert moespec.load(art).d_model == 8


@pytest.mark.parametrize(
    "key",
    ["format_version", "moespec_version", "spec_name", "spec_sha256", "layer", "op_set", "seed", "files"],
)
def test_manifest_entry_missing(art: Path, key: str) -> None:
    write_manifest(art, {k: v for k, v in manifest(art).items() if k != key})
    assert load_error(art) == _invalid(art, f"{key}: missing")


# --- versions (moespec/runtime/manifest.py: check_versions) ----------------------------------


@pytest.mark.parametrize("version", ["0.0.1", "0.2.0", "1.1.0"])
def test_other_release_series_is_refused(art: Path, version: str) -> None:
    # Until 0.1 the rule was "log and load"; the README promises an error instead (issue 19).
    write_manifest(art, {**manifest(art), "moespec_version": version})
    theirs = ".".join(version.split(".")[:2])
    assert load_error(art) == (
        f"{art / 'manifest.json'}: built by moespec {version}, a release series ({theirs}) other than "
        f"this moespec {moespec.__version__} (0.1); rebuild it from its spec.lock.yaml with "
        "`moespec build`, or load it with that moespec"
    )


@pytest.mark.parametrize("version", ["0.1.0", "0.1.99", "0.1.1.dev3"])
def test_same_release_series_loads_without_a_warning(
    art: Path, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert moespec.__version__.startswith("0.1.")
    write_manifest(art, {**manifest(art), "moespec_version": version})
    with caplog.at_level(logging.WARNING):
        assert moespec.load(art).d_model == 8
    assert caplog.messages == []


def test_other_torch_version_is_provenance_only(art: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = manifest(art)
    write_manifest(art, {**m, "versions": {**m["versions"], "torch": "1.0.0", "safetensors": "0.0.1"}})
    with caplog.at_level(logging.WARNING):
        assert moespec.load(art).d_model == 8
    assert caplog.messages == []


# --- moespec/runtime/load.py ---------------------------------------------------------------


def test_unknown_op(art: Path) -> None:
    m = manifest(art)
    write_manifest(art, {**m, "op_set": [*m["op_set"], "moespec::warp_drive", "moespec::a_b"]})
    assert load_error(art) == (
        f"{art}: the artifact uses ops this moespec {moespec.__version__} does not provide: "
        f"moespec::a_b, moespec::warp_drive (built by moespec {m['moespec_version']}); rebuild it "
        "from its spec.lock.yaml with `moespec build`"
    )


def test_manifest_hash_is_not_the_lock_files(art: Path) -> None:
    m = manifest(art)
    write_manifest(art, {**m, "spec_sha256": "0" * 64})
    assert load_error(art) == (
        f"{art / 'spec.lock.yaml'}: the resolved spec does not match the artifact (sha256 "
        f"{m['spec_sha256'][:12]}..., manifest says 000000000000...); the lock file was edited. "
        "Rebuild with `moespec build` instead."
    )


def test_edited_lock_file(art: Path) -> None:
    lock = art / "spec.lock.yaml"
    text = lock.read_text(encoding="utf-8")
    assert text.count("temperature: 2.0\n") == 1
    lock.write_text(text.replace("temperature: 2.0\n", "temperature: 3.0\n"), encoding="utf-8")
    record(art, "spec.lock.yaml")
    before, after = (
        f"{art / 'spec.lock.yaml'}: the resolved spec does not match the artifact (sha256 ",
        f"..., manifest says {manifest(art)['spec_sha256'][:12]}...); the lock file was edited. "
        "Rebuild with `moespec build` instead.",
    )
    assert re.fullmatch(re.escape(before) + "[0-9a-f]{12}" + re.escape(after), load_error(art))


def test_truncated_weights(art: Path) -> None:
    path = art / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    record(art, "model.safetensors")
    assert re.fullmatch(re.escape(f"{path}: unreadable weights file (") + r".+\)", load_error(art))


def _weights_error(art: Path, *problems: str) -> str:
    return f"{art / 'model.safetensors'}: weights were written for another artifact: " + "; ".join(problems)


def test_weights_metadata_format(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: meta.update(format="hf"))
    assert load_error(art) == _weights_error(art, "layout 'hf', expected 'moespec-native'")


def test_weights_metadata_spec_sha256(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: meta.update(spec_sha256="f" * 64))
    sha = manifest(art)["spec_sha256"]
    assert load_error(art) == _weights_error(art, f"spec sha256 ffffffffffff... is not {sha[:12]}...")


def test_weights_metadata_layer(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: meta.update(layer="late"))
    assert load_error(art) == _weights_error(art, "layer 'late' is not 'early'")


def test_weights_of_the_other_layer(art: Path, built: dict[str, Path]) -> None:
    """The `late` group's weights (same spec, same shapes) in the `early` artifact."""
    shutil.copyfile(built["late"] / "model.safetensors", art / "model.safetensors")
    record(art, "model.safetensors")
    assert load_error(art) == _weights_error(art, "layer 'late' is not 'early'")


def test_weights_without_metadata(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: meta.clear())
    sha = manifest(art)["spec_sha256"]
    assert load_error(art) == _weights_error(
        art, "layout None, expected 'moespec-native'", f"spec sha256 None... is not {sha[:12]}...",
        "layer None is not 'early'",
    )  # fmt: skip


def _state_error(art: Path, *blocks: str) -> str:
    return "\n".join(
        [f"{art / 'model.safetensors'}: the weights do not match the layer the spec builds", *blocks]
    )


def test_missing_key(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: state.pop("experts.0.w_gate"))
    assert load_error(art) == _state_error(art, "  missing keys (1):\n    experts.0.w_gate")


def test_unexpected_key(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: state.update({"experts.0.w_extra": torch.zeros(1)}))
    assert load_error(art) == _state_error(art, "  unexpected keys (1):\n    experts.0.w_extra")


def test_many_unexpected_keys_are_cut_short(art: Path) -> None:
    rewrite_weights(
        art, lambda state, meta: state.update({f"extra.{i:02}": torch.zeros(1) for i in range(23)})
    )
    listed = "\n".join(f"    extra.{i:02}" for i in range(20))
    assert load_error(art) == _state_error(art, f"  unexpected keys (23):\n{listed}\n    ... and 3 more")


def test_shape_mismatch(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: state.update({"router.weight": torch.zeros(3, 8)}))
    assert load_error(art) == _state_error(
        art, "  shape mismatches (1):\n    router.weight: file has [3, 8], the spec needs [2, 8]"
    )


def test_dtype_mismatch(art: Path) -> None:
    rewrite_weights(art, lambda state, meta: state.update({"router.weight": state["router.weight"].double()}))
    assert load_error(art) == _state_error(
        art,
        "  dtype mismatches (1):\n    router.weight: file has torch.float64, the spec needs torch.float32",
    )


def test_controller_state_not_in_fp32(tmp_path: Path) -> None:
    # An artifact written before controller state was kept in fp32 (a bf16 layer stored
    # ReMoE's λ in bf16, rounded): refused with the reason, never upcast silently.
    spec = {
        "moespec": 1,
        "name": "controller",
        "d_model": 8,
        "layer": {
            "experts": {"routed": [{"count": 4, "kind": "mlp", "activation": "relu", "d_ff": 4}]},
            "router": {"kind": "relu", "k": 2},
        },
        "target": {"dtype": "bf16", "router_dtype": "bf16"},
    }
    art = tmp_path / "art"
    moespec.build_artifact(spec, art)

    def to_bf16(state: dict[str, torch.Tensor], _meta: dict[str, str]) -> None:
        state["router.l1_coeff"] = state["router.l1_coeff"].to(torch.bfloat16)

    rewrite_weights(art, to_bf16)
    assert load_error(art) == (
        f"{art / 'model.safetensors'}: the weights do not match the layer the spec builds\n"
        "  dtype mismatches (1):\n    router.l1_coeff: file has torch.bfloat16, the spec needs "
        "torch.float32 (a running controller's state, kept in fp32: rebuild the artifact)"
    )
