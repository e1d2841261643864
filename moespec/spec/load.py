"""Load a spec: compose, validate with pydantic, run semantic checks, locate every error.

This is the front door of the spec language: :func:`load_spec` returns a validated
:class:`LoadedSpec` or raises one :class:`~moespec.errors.SpecError` holding every problem,
each pointing at the file position (or command-line override) that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moespec.errors import Diagnostic, Origin, SpecError, spec_error
from moespec.spec import validate
from moespec.spec.compose import compose, compose_data
from moespec.spec.schema import Spec
from moespec.spec.yamlio import Sourced


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec together with the composed tree that remembers provenance."""

    spec: Spec
    tree: Sourced

    def provenance(self) -> dict[str, Origin]:
        """``dotted.path -> Origin`` for every leaf value set by a file or override."""
        out: dict[str, Origin] = {}

        def walk(node: Sourced, path: str) -> None:
            if isinstance(node.value, dict):
                for k, v in node.value.items():
                    walk(v, f"{path}.{k}" if path else k)
            elif isinstance(node.value, list) and node.value:
                for i, v in enumerate(node.value):
                    walk(v, f"{path}.{i}")
            else:
                out[path] = node.origin

        walk(self.tree, "")
        return out


def locate(
    tree: Sourced, loc: tuple[Any, ...], *, is_key: bool = False, missing: bool = False
) -> tuple[Origin, str, str]:
    """Map a pydantic/semantic error location to ``(origin, dotted path, note)``.

    Location parts that are not keys of the current mapping (discriminator tags such as
    ``topk``, union branch names) are skipped and left out of the printed path.
    """
    node, parts = tree, []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        child = None
        if isinstance(node.value, dict) and isinstance(part, str):
            child = node.value.get(part)
        elif isinstance(node.value, list) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
        if child is None:
            if last and (missing or (isinstance(node.value, dict) and isinstance(part, str))):
                parts.append(str(part))
                # Point at the parent's key (`layer:`) rather than its first child.
                where = node.key_origin or node.origin
                owner = f"`{parts[-2]}`" if len(parts) > 1 else "the spec"
                return where, ".".join(parts), f"{owner} needs a `{part}:` key"
            continue
        parts.append(str(part))
        node = child
    origin = node.key_origin if is_key and node.key_origin else node.origin
    return origin, ".".join(parts), ""


def _pydantic_diagnostics(tree: Sourced, err: ValidationError) -> list[Diagnostic]:
    out = []
    for e in err.errors(include_url=False):
        kind, loc = e["type"], tuple(e["loc"])
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            # Point at the discriminator itself: its value, or where the key is missing.
            loc += (str(e.get("ctx", {}).get("discriminator", "kind")).strip("'"),)
        missing = kind in ("missing", "union_tag_not_found")
        origin, path, note = locate(tree, loc, is_key=kind == "extra_forbidden", missing=missing)
        msg = note if missing and note else _message(e)
        if note and not missing:
            msg = f"{msg} ({note})"
        out.append(Diagnostic(origin, path, msg))
    return out


_TYPE_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}  # fmt: skip


def _got(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _message(e: dict[str, Any]) -> str:
    kind, msg, value = e["type"], e["msg"], e.get("input")
    loc = e["loc"]
    if kind == "extra_forbidden":
        return "unknown key (not part of the spec language)"
    if kind == "missing":
        return "required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping, got {_got(value)}"
    if kind == "literal_error" and loc and loc[-1] == "kind":
        return f"unknown kind {value!r}; expected {e.get('ctx', {}).get('expected')}"
    if kind == "literal_error" and tuple(loc) == ("moespec",):
        return f"unsupported spec language version {value!r} (this moespec reads version 1)"
    if kind in ("int_type", "float_type") and isinstance(value, str):
        # Only a quoted number reaches here as a numeric-looking string (YAML 1.2 reads 8 as 8).
        if _numeric(value):
            return f"{msg}, got a string; remove the quotes if you meant a number [{kind}]"
        return f"{msg}, got the string {value!r} [{kind}]"
    if (
        kind == "bool_type"
        and isinstance(value, str)
        and value.lower() in ("yes", "no", "on", "off", "y", "n")
    ):
        return f"{msg}: {value!r} is a string in YAML 1.2; write true or false [{kind}]"
    if kind == "union_tag_invalid":
        ctx = e.get("ctx", {})
        return f"unknown kind {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "a `kind:` key is required here"
    return f"{msg} [{kind}]"


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    # A base-layer error repeats for each group inheriting it: same origin, same message.
    seen: set[tuple[str, str]] = set()
    out = []
    for d in diags:
        key = (str(d.origin), d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def validate_tree(tree: Sourced) -> LoadedSpec:
    """Validate a composed tree: schema errors first; semantic checks once the schema passes."""
    if not isinstance(tree.value, dict):
        raise spec_error(tree.origin, "", "a spec must be a mapping at the top level")
    try:
        spec = Spec.model_validate(tree.plain())
    except ValidationError as err:
        raise SpecError(_dedupe(_pydantic_diagnostics(tree, err))) from None
    problems = validate.check(spec)
    if problems:
        diags = []
        for loc, msg in problems:
            origin, path, note = locate(tree, loc)
            diags.append(Diagnostic(origin, path, f"{msg} ({note})" if note else msg))
        raise SpecError(_dedupe(diags))
    return LoadedSpec(spec, tree)


def load_spec(
    source: str | Path | dict | Spec | LoadedSpec, overrides: tuple[str, ...] | list[str] = ()
) -> LoadedSpec:
    """Load and validate a spec from a path, a dict or an already validated spec."""
    if isinstance(source, LoadedSpec):
        source = source.spec
    if isinstance(source, Spec):
        source = source.model_dump(mode="json", exclude={"extends"})
    if isinstance(source, dict):
        return validate_tree(compose_data(source, overrides))
    return validate_tree(compose(Path(source), overrides))
