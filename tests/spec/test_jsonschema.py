"""The committed JSON Schema is current, draft-07, and agrees with the models."""

from __future__ import annotations

import json

import jsonschema
import pytest

from moespec.resources import schema_path
from moespec.spec.jsonschema import json_schema, json_schema_text


def test_committed_schema_is_current():
    assert schema_path().read_text(encoding="utf-8") == json_schema_text(), (
        "schemas/moespec.v1.schema.json is stale: run `make schema` and commit it"
    )


def test_schema_is_valid_draft07_without_newer_keywords():
    schema = json_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    text = json.dumps(schema)
    for newer in ("$defs", "prefixItems", "unevaluatedProperties", "dependentRequired"):
        assert newer not in text


def test_discriminators_have_no_default_and_are_required():
    defs = json_schema()["definitions"]
    for name, d in defs.items():
        kind = d.get("properties", {}).get("kind")
        if kind is not None and "const" in kind:
            assert "default" not in kind, name
            assert "kind" in d.get("required", []), name


@pytest.mark.parametrize(
    "doc, ok",
    [
        (
            {
                "moespec": 1,
                "name": "x",
                "d_model": 8,
                "layer": {
                    "experts": {"routed": [{"count": 2, "kind": "mlp", "activation": "relu", "d_ff": 4}]},
                    "router": {"kind": "topk", "k": 1},
                },
            },
            True,
        ),
        ({"moespec": 1, "name": "x", "d_model": "8", "layer": {}}, False),
        ({"moespec": 1, "name": "x", "d_model": 8, "typo": 1, "layer": {}}, False),
    ],
)
def test_independent_validator_agrees(doc, ok):
    errors = list(jsonschema.Draft7Validator(json_schema()).iter_errors(doc))
    assert (not errors) == ok
