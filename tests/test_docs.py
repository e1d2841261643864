"""The README's spec reference is generated from the models and must be current."""

from __future__ import annotations

from pathlib import Path

from moespec.spec.docgen import _models_in, reference_markdown, render_readme
from moespec.spec.schema import Spec

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_is_current():
    text = README.read_text(encoding="utf-8")
    assert render_readme(text) == text, "README spec reference is stale: run python -m moespec.spec.docgen"


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
    assert "#### TopKRouter" in reference_markdown()


def test_readme_mentions_both_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text
