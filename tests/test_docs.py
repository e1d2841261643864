"""The docs: the generated spec reference is current, the README stays the user's page."""

from __future__ import annotations

import re
from pathlib import Path

from moespec.spec.docgen import REGENERATE, _models_in, reference_markdown, reference_path, render_reference
from moespec.spec.schema import Spec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_spec_reference_is_current():
    path = reference_path()
    assert path == ROOT / "docs" / "spec-reference.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    assert render_reference() == text, f"docs/spec-reference.md is stale: run `{REGENERATE}` (or `make docs`)"


def test_every_field_has_a_description():
    seen, queue = set(), [Spec]
    while queue:
        model = queue.pop()
        if model in seen:
            continue
        seen.add(model)
        assert model.__doc__, model
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            queue.extend(_models_in(f.annotation))
    assert len(seen) > 15
    assert "## TopKRouter" in reference_markdown()


def test_readme_mentions_both_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 300, f"README.md has {lines} lines; move detail to docs/ and link it"


def test_relative_links_resolve():
    """Every relative link of the README and docs/*.md names a file that exists."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, missing
