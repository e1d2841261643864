"""extends:, command-line overrides, layer groups and provenance."""

from __future__ import annotations

from pathlib import Path

import pytest

from moespec import SpecError, load_spec
from moespec.spec.compose import compose

BASE = """\
moespec: 1
name: base
d_model: 32
layer:
  experts:
    routed:
      - {count: 4, kind: glu, activation: silu, d_ff: 64}
  router: {kind: topk, k: 2}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "extends: ../base.yaml\nname: child\nlayer:\n  router: {k: 1}\n"
        "  experts:\n    routed:\n      - {count: 8, kind: mlp, activation: relu, d_ff: 16}\n"
    )
    return tmp_path


def test_extends_maps_merge_lists_replace(tree: Path):
    loaded = load_spec(tree / "sub" / "child.yaml")
    s = loaded.spec
    assert s.name == "child" and s.d_model == 32
    assert s.layer.router.k == 1 and s.layer.router.kind == "topk"  # map merged
    assert [g.count for g in s.layer.experts.routed] == [8]  # list replaced
    prov = loaded.provenance()
    assert prov["d_model"].file.endswith("base.yaml") and prov["d_model"].line == 3
    assert prov["layer.router.k"].file.endswith("child.yaml")
    assert prov["layer.router.kind"].file.endswith("base.yaml")


def test_extends_list_applies_in_order(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text("d_model: 64\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nname: c\n")
    assert load_spec(tmp_path / "c.yaml").spec.d_model == 64


def test_extends_cycle_and_missing(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(SpecError, match="`extends` cycle"):
        compose(tmp_path / "a.yaml")
    (tmp_path / "m.yaml").write_text("extends: [nope.yaml, 3]\n")
    with pytest.raises(SpecError) as ei:
        compose(tmp_path / "m.yaml")
    msgs = [d.message for d in ei.value.diagnostics]
    assert "extended file not found" in msgs[0] and "must be a file path" in msgs[1]


def test_overrides_set_add_delete(tree: Path):
    path = tree / "base.yaml"
    s = load_spec(
        path,
        [
            "layer.router.k=1",
            "+layer.router.score=sigmoid",
            "~layer.router.k",
            "+layer.router.k=3",
            "layer.experts.routed.0.d_ff=128",
        ],
    ).spec
    assert (s.layer.router.k, s.layer.router.score, s.layer.experts.routed[0].d_ff) == (3, "sigmoid", 128)
    s = load_spec(path, ["+layer.router.groups={n_groups: 2, topk_groups: 1}"]).spec
    assert s.layer.router.groups.n_groups == 2


@pytest.mark.parametrize(
    "token, fragment, col",
    [
        ("layer.router.k=0", "greater than 0", 16),
        ("layer.nope.k=1", "use +layer.nope=... to add it", 1),
        ("+layer.router.k=1", "already set", 1),
        ("~layer.router.score", "cannot delete", 1),
        ("layer..k=1", "bad override path", 1),
        ("justaword", "override must look like", 1),
        ("layer.router.k=[1", "invalid YAML", 18),
    ],
)
def test_override_errors_point_at_the_override(tree: Path, token: str, fragment: str, col: int):
    with pytest.raises(SpecError) as ei:
        load_spec(tree / "base.yaml", [token])
    (d,) = ei.value.diagnostics
    assert fragment in d.message
    assert (d.origin.file, d.origin.col, d.origin.text) == ("<cli>", col, token)
    assert d.format().splitlines()[1].strip() == token


def test_set_a_key_the_file_leaves_to_its_default(tree: Path):
    s = load_spec(tree / "base.yaml", ["layer.router.order=topk_then_softmax"]).spec
    assert s.layer.router.order == "topk_then_softmax"
    with pytest.raises(SpecError) as ei:
        load_spec(tree / "base.yaml", ["layer.router.ordr=x"])
    (d,) = ei.value.diagnostics
    assert d.origin.file == "<cli>" and "unknown key" in d.message


def test_groups_patch_the_base_layer(tree: Path):
    (tree / "g.yaml").write_text(
        BASE + "groups:\n  - {name: early, count: 3, layer: {router: {k: 1}}}\n"
        "  - name: late\n    count: 2\n    layer: {experts: {routed: [{count: 2, kind: mlp, "
        "activation: gelu, d_ff: 8}]}}\n"
    )
    loaded = load_spec(tree / "g.yaml")
    (n1, c1, l1), (n2, c2, l2) = loaded.spec.layer_groups()
    assert (n1, c1, l1.router.k, l1.experts.routed[0].d_ff) == ("early", 3, 1, 64)
    assert (n2, c2, l2.router.k, l2.experts.routed[0].count) == ("late", 2, 2, 2)
    prov = loaded.provenance()
    assert prov["groups.0.layer.router.k"].line == 10
    assert prov["groups.0.layer.router.kind"].line == 8  # inherited from the base layer


def test_base_layer_error_is_reported_once_even_with_groups(tree: Path):
    (tree / "g.yaml").write_text(
        BASE.replace("k: 2", "k: 9") + "groups:\n  - {name: a, layer: {}}\n  - {name: b}\n"
    )
    with pytest.raises(SpecError) as ei:
        load_spec(tree / "g.yaml")
    assert len(ei.value.diagnostics) == 1
    assert ei.value.diagnostics[0].origin.line == 8


def test_dict_and_spec_sources_round_trip(tree: Path):
    loaded = load_spec(tree / "base.yaml")
    again = load_spec(loaded.spec)
    assert again.spec == loaded.spec
    from_dict = load_spec(loaded.spec.model_dump(mode="json", exclude={"extends"}), ["layer.router.k=1"])
    assert from_dict.spec.layer.router.k == 1
