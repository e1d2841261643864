"""A spec dict as YAML with comments naming the transformers config field each value comes
from (``moespec convert --from-hf``). Specs are plain nested dicts of scalars and lists of
dicts, so a small emitter is enough; every scalar is written as JSON, which YAML 1.2 reads
back unchanged (the test loads the file with moespec's own loader)."""

from __future__ import annotations

import json
from typing import Any


def spec_yaml(spec: dict, sources: dict[str, str], header: list[str]) -> str:
    """``spec`` as YAML; ``sources`` maps a dotted path (``layer.router.k``) to its config
    field, written as a trailing comment; ``header`` lines become leading comments."""
    lines = [f"# {h}" if h else "#" for h in header]
    _emit(spec, "", 0, sources, lines)
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    return json.dumps(v)


def _comment(path: str, sources: dict[str, str]) -> str:
    src = sources.get(path)
    return f"  # config.{src}" if src else ""


def _emit(
    node: dict, path: str, indent: int, sources: dict[str, str], out: list[str], first: str = ""
) -> None:
    pad = " " * indent
    for i, (key, value) in enumerate(node.items()):
        lead = first if i == 0 and first else pad
        here = f"{path}.{key}" if path else key
        if isinstance(value, dict):
            out.append(f"{lead}{key}:{_comment(here, sources)}")
            _emit(value, here, indent + 2, sources, out)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(f"{lead}{key}:{_comment(here, sources)}")
            for j, item in enumerate(value):
                _emit(item, f"{here}.{j}", indent + 4, sources, out, first=" " * (indent + 2) + "- ")
        else:
            out.append(f"{lead}{key}: {_scalar(value)}{_comment(here, sources)}")
