"""JSON Schema export kept within draft-07, which yaml-language-server understands.

pydantic emits 2020-12 style (``$defs``); we rename it to draft-07's ``definitions`` and
rewrite the references. ``discriminator`` (an OpenAPI keyword) is kept: validators ignore it
and some editors use it for better completion.
"""

from __future__ import annotations

import json
from typing import Any

from moespec.spec.schema import Spec

SCHEMA_ID = "https://moespec.dev/schemas/moespec.v1.schema.json"


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                out[k] = v.replace("#/$defs/", "#/definitions/")
            elif k == "discriminator" and isinstance(v, dict):
                out[k] = {
                    "propertyName": v["propertyName"],
                    "mapping": {t: r.replace("#/$defs/", "#/definitions/") for t, r in v["mapping"].items()},
                }
            else:
                out["definitions" if k == "$defs" else k] = _rewrite(v)
        return out
    if isinstance(node, list):
        return [_rewrite(v) for v in node]
    return node


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a moespec v1 spec, draft-07 flavoured."""
    body = _rewrite(Spec.model_json_schema(mode="validation"))
    return {"$schema": "http://json-schema.org/draft-07/schema#", "$id": SCHEMA_ID, **body}


def json_schema_text() -> str:
    """The schema as the exact text committed to ``schemas/moespec.v1.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
