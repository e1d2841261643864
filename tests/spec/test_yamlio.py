"""The YAML loader: YAML 1.2 scalars, duplicate keys, merge keys, positions."""

from __future__ import annotations

import math

import pytest

from moespec.errors import SpecError
from moespec.spec.yamlio import load_text


def plain(text: str):
    return load_text(text, "t.yaml").plain()


def test_yaml12_booleans_and_numbers():
    assert plain("a: no\nb: yes\nc: on\nd: off\ne: true\nf: False") == {
        "a": "no",
        "b": "yes",
        "c": "on",
        "d": "off",
        "e": True,
        "f": False,
    }
    assert plain("a: 1e-3\nb: .5\nc: 010\nd: 0x1f\ne: 0o17\nf: -2") == {
        "a": 1e-3,
        "b": 0.5,
        "c": 10,
        "d": 31,
        "e": 15,
        "f": -2,
    }
    got = plain("a: .inf\nb: -.inf\nc: .nan\nd: ~\ne: null\nf: 1_000\ng: 2026-01-01\nh: 1:20")
    assert got["a"] == math.inf and got["b"] == -math.inf and math.isnan(got["c"])
    assert got["d"] is None and got["e"] is None
    # YAML 1.1 oddities stay strings (PyYAML would give 1000, a date and 80).
    assert (got["f"], got["g"], got["h"]) == ("1_000", "2026-01-01", "1:20")


def test_duplicate_key_is_reported_with_both_positions():
    with pytest.raises(SpecError) as ei:
        load_text("a: 1\nb:\n  c: 1\n  c: 2\n", "t.yaml")
    (d,) = ei.value.diagnostics
    assert (d.origin.line, d.origin.col, d.path) == (4, 3, "b.c")
    assert "duplicate key 'c' (first defined at t.yaml:3:3)" in d.message


def test_every_duplicate_is_reported_at_once():
    with pytest.raises(SpecError) as ei:
        load_text("a: 1\na: 2\nb: 1\nb: 2\n", "t.yaml")
    assert [d.path for d in ei.value.diagnostics] == ["a", "b"]


def test_positions_of_values_and_keys():
    tree = load_text("top:\n  k: 5\n  l: [1, 2]\n", "t.yaml")
    k = tree.get(("top", "k"))
    assert (k.origin.line, k.origin.col, k.key_origin.col) == (2, 6, 3)
    assert tree.get(("top", "l", 1)).origin.col == 10


def test_merge_keys_and_anchors():
    got = plain("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n")
    assert got["d"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("a: [1, 2\n", "invalid YAML"),
        ("a: 1\n b: 2\n", "invalid YAML"),
        ("a: !!python/object:os.system x\n", "explicit YAML tags are not supported"),
        ("a: !!binary AA==\n", "explicit YAML tags are not supported"),
        ("? [1, 2]\n: x\n", "mapping keys must be strings"),
        ("1: x\n", "mapping keys must be strings"),
        ("a: 1\x00\n", "NUL"),
        ("a: 1\n---\nb: 2\n", "invalid YAML"),
    ],
)
def test_bad_yaml_is_a_spec_error(text, fragment):
    with pytest.raises(SpecError) as ei:
        load_text(text, "t.yaml")
    assert fragment in ei.value.format()
