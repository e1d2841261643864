"""``python -m moespec.hf``: rewrite docs/hf.md's transformers family table from
:mod:`moespec.hf.table` (a test fails when the committed table is stale)."""

from pathlib import Path

from moespec.hf.table import render_page

page = Path(__file__).resolve().parents[2] / "docs" / "hf.md"
page.write_text(render_page(page.read_text(encoding="utf-8")), encoding="utf-8")
