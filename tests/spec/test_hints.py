"""Hints that point the right way (issue 19 §5): a bare word where a number belongs, a key
with a default set on a spec that omits its section, a document far too large for a spec."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import moespec
from moespec.spec.yamlio import MAX_NODES, load_text

TINY = Path(__file__).resolve().parents[2] / "specs" / "debug-tiny.yaml"


def errors(overrides: list[str]) -> str:
    with pytest.raises(moespec.SpecError) as ei:
        moespec.load_spec(TINY, overrides)
    return str(ei.value)


def test_a_word_is_not_told_to_lose_quotes_it_never_had() -> None:
    msg = errors(["layer.router.k=abc"])
    assert "got the string 'abc' [int_type]" in msg and "quotes" not in msg
    assert "remove the quotes if you meant a number" in errors(['layer.router.k="2"'])


def test_a_key_with_a_default_can_be_set_without_its_section() -> None:
    spec = moespec.load_spec(TINY, ["target.dtype=bf16", "placement.mapping=round_robin"]).spec
    assert spec.target.dtype == "bf16" and spec.placement.mapping == "round_robin"


def test_a_misspelt_section_is_still_refused() -> None:
    msg = errors(["targt.dtype=bf16"])
    assert "targt.dtype: the spec does not set 'targt'; use +targt=... to add it" in msg


def test_a_huge_document_stops_early_and_names_the_limit() -> None:
    text = "moespec: 1\n" + "".join(f"k{i}: {i}\n" for i in range(3 * MAX_NODES))
    start = time.perf_counter()
    with pytest.raises(moespec.SpecError, match=f"more than {MAX_NODES} YAML values"):
        load_text(text, "big.yaml")
    # It stops about a third of the way in rather than composing all of it.
    assert time.perf_counter() - start < 20


def test_an_alias_bomb_is_named() -> None:
    rows = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcd", "bcde", strict=True):
        rows.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")
    rows.append("f: [*e, *e]")
    with pytest.raises(moespec.SpecError, match="aliases expand the document to more than"):
        load_text("\n".join(rows) + "\n", "bomb.yaml")
