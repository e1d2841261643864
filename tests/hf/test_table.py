"""The family table: every MoE family the installed transformers ships is either adapted or
listed with its reason, and docs/hf.md shows the table as generated."""

from __future__ import annotations

from pathlib import Path

import pytest

from moespec.hf.registry import FAMILIES
from moespec.hf.table import UNSUPPORTED, discover, render_page, rows, status

pytest.importorskip("transformers")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "hf.md"


def test_every_installed_moe_family_is_in_the_table() -> None:
    found = discover()
    assert len(found) > 50, "the scan found too few MoE families: is the pattern broken?"
    for known in ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers", "jamba"):
        assert known in found
    missing = sorted(f for f in found if f not in FAMILIES and f not in UNSUPPORTED)
    assert not missing, (
        f"transformers ships MoE families moespec.hf's table does not mention: {missing}; add an adapter "
        "or a reason to moespec/hf/table.py"
    )


def test_table_has_no_family_twice_and_no_stale_entry() -> None:
    assert not set(FAMILIES) & set(UNSUPPORTED), "a family is both adapted and listed unsupported"
    gone = sorted((set(FAMILIES) | set(UNSUPPORTED)) - set(discover()))
    assert not gone, f"the table mentions families the installed transformers does not ship: {gone}"


def test_status() -> None:
    assert status("mixtral") is None
    assert status("gpt_oss") is None
    assert "SparseMixer" in status("phimoe")
    assert "not in moespec's family table" in status("no_such_family")
    assert dict(rows())["mixtral"] == "parity-tested"
    assert dict(rows())["deepseek_v3"].startswith(
        "parity-tested; transformers keeps the correction bias frozen"
    )
    assert dict(rows())["phimoe"].startswith("unsupported: SparseMixer routing")


def test_family_table_page_is_current() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert render_page(text) == text, "docs/hf.md's family table is stale: run `python -m moespec.hf`"
