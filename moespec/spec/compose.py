"""Compose a spec: ``extends:`` files, command-line overrides and layer groups.

Merge rules (documented in the README): mappings merge key by key, everything else (lists,
scalars) replaces. Each :class:`~moespec.spec.yamlio.Sourced` node keeps its origin through
the merge, so an error in the final spec points at the file (or override) that set it.

Override grammar (a small subset of Hydra's):
  ``a.b=v``   set a key (``v`` is parsed as YAML); the parent ``a`` must exist, so a
              misspelt path fails here and a misspelt leaf fails schema validation
  ``+a.b=v``  add a key the spec does not set yet, creating missing parent mappings
  ``~a.b``    delete a key
A numeric path part indexes a list: ``layer.experts.routed.0.d_ff=128``.
"""

from __future__ import annotations

import copy
from pathlib import Path

from moespec.errors import Diagnostic, Origin, SpecError, spec_error
from moespec.spec.yamlio import Sourced, from_plain, load_file, parse_scalar_text


def merge(base: Sourced, over: Sourced) -> Sourced:
    """Deep-merge ``over`` onto ``base`` (maps merge, anything else replaces)."""
    if isinstance(base.value, dict) and isinstance(over.value, dict):
        out = dict(base.value)
        for key, node in over.value.items():
            out[key] = merge(out[key], node) if key in out else node
        return Sourced(out, over.origin, over.key_origin or base.key_origin)
    result = copy.copy(over)
    result.key_origin = over.key_origin or base.key_origin
    return result


def _as_list(node: Sourced) -> list[Sourced]:
    return node.value if isinstance(node.value, list) else [node]


def load_composed(path: Path, _stack: tuple[Path, ...] = ()) -> Sourced:
    """Load ``path`` and everything it ``extends:`` (relative to the file), merged."""
    resolved = path.resolve()
    tree = load_file(path)
    if not isinstance(tree.value, dict):
        raise spec_error(tree.origin, "", "a spec must be a mapping at the top level")
    ext = tree.value.pop("extends", None)
    if ext is None:
        return tree
    base: Sourced | None = None
    problems: list[Diagnostic] = []
    for i, item in enumerate(_as_list(ext)):
        where = "extends" if not isinstance(ext.value, list) else f"extends.{i}"
        if not isinstance(item.value, str) or not item.value:
            problems.append(Diagnostic(item.origin, where, "must be a file path (a string)"))
            continue
        target = path.parent / item.value
        if target.resolve() in (*_stack, resolved):
            chain = " -> ".join(str(p) for p in (*_stack, resolved, target.resolve()))
            problems.append(Diagnostic(item.origin, where, f"`extends` cycle: {chain}"))
            continue
        if not target.is_file():
            problems.append(Diagnostic(item.origin, where, f"extended file not found: {target}"))
            continue
        try:
            loaded = load_composed(target, (*_stack, resolved))
        except SpecError as e:
            problems.extend(e.diagnostics)
            continue
        base = loaded if base is None else merge(base, loaded)
    if problems:
        raise SpecError(problems)
    return merge(base, tree) if base is not None else tree


def _split_path(text: str, origin: Origin) -> list[str | int]:
    parts = text.split(".")
    if not text or any(p == "" for p in parts):
        raise spec_error(origin, text, "bad override path (expected a.b.c)")
    return [int(p) if p.isdigit() else p for p in parts]


def apply_override(tree: Sourced, token: str) -> None:
    """Apply one ``a.b=v`` / ``+a.b=v`` / ``~a.b`` override to ``tree`` in place."""
    op = token[0] if token[:1] in ("+", "~") else "="
    body = token[1:] if op != "=" else token
    if op == "~":
        key_text, value_text = body, None
    elif "=" not in body:
        raise spec_error(
            Origin("<cli>", 1, 1, token), "", "override must look like a.b=value, +a.b=value or ~a.b"
        )
    else:
        key_text, value_text = body.split("=", 1)
    key_origin = Origin("<cli>", 1, 1, token)
    path = _split_path(key_text, key_origin)
    *parents, last = path
    node = tree
    for i, part in enumerate(parents):
        child = _child(node, part)
        if child is None:
            if op == "~":
                raise spec_error(
                    key_origin, key_text, f"cannot delete: the spec does not set {_dot(path[: i + 1])!r}"
                )
            if isinstance(node.value, list):
                raise spec_error(key_origin, key_text, _index_error(part, node))
            if op != "+" and not _defaulted_section(path[: i + 1]):
                raise spec_error(key_origin, key_text, _missing_hint(path[: i + 1]))
            child = Sourced({}, key_origin, key_origin)
            _set_child(node, part, child, key_origin)
        node = child
    exists = _child(node, last) is not None
    if op == "~":
        if not exists:
            raise spec_error(key_origin, key_text, "cannot delete: the spec does not set this key")
        if isinstance(node.value, dict):
            del node.value[str(last)]
        else:
            node.value.pop(last)
        return
    if op == "+" and exists:
        raise spec_error(key_origin, key_text, f"already set; use {key_text}=... to change it")
    value_origin = Origin("<cli>", 1, len(token) - len(value_text) + 1, token)
    value = from_plain(parse_scalar_text(value_text, value_origin), value_origin)
    _set_child(node, last, value, key_origin)


def _dot(path: list[str | int]) -> str:
    return ".".join(map(str, path))


def _defaulted_section(path: list[str | int]) -> bool:
    """True when ``path`` names a section of the language that has defaults (``target``,
    ``placement``, ``layer.losses``): ``target.dtype=bf16`` then works on a spec without a
    ``target:`` block, as ``explain`` lists it. A misspelt or kind-dependent parent (a union,
    a list) is still refused, so typos are caught at the override."""
    from pydantic import BaseModel

    from moespec.spec.schema import Spec  # the language's shape (no cycle: schema needs no compose)

    model: type[BaseModel] = Spec
    field = None
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return False
        model = ann
    return field is not None and not field.is_required()


def _missing_hint(path: list[str | int]) -> str:
    return f"the spec does not set {_dot(path)!r}; use +{_dot(path)}=... to add it"


def _index_error(part: str | int, node: Sourced) -> str:
    n = len(node.value)
    return f"index {part} is out of range (the list has {n} item{'s' if n != 1 else ''})"


def _child(node: Sourced, part: str | int) -> Sourced | None:
    if isinstance(node.value, dict):
        return node.value.get(str(part))
    if isinstance(node.value, list) and isinstance(part, int):
        return node.value[part] if part < len(node.value) else None
    return None


def _set_child(node: Sourced, part: str | int, value: Sourced, key_origin: Origin) -> None:
    value.key_origin = key_origin
    if isinstance(node.value, dict):
        node.value[str(part)] = value
    elif isinstance(node.value, list) and isinstance(part, int) and part < len(node.value):
        node.value[part] = value
    elif isinstance(node.value, list) and isinstance(part, int) and part == len(node.value):
        node.value.append(value)  # `+list.N=v` appends
    elif isinstance(node.value, list):
        raise spec_error(key_origin, key_origin.text or "", _index_error(part, node))
    else:
        raise spec_error(key_origin, key_origin.text or "", f"cannot set {part!r} inside a non-mapping value")


def expand_groups(tree: Sourced) -> None:
    """Merge each ``groups[i].layer`` patch over the top-level ``layer``, in place."""
    if not isinstance(tree.value, dict):
        return
    layer, groups = tree.value.get("layer"), tree.value.get("groups")
    if layer is None or groups is None or not isinstance(groups.value, list):
        return
    for group in groups.value:
        if not isinstance(group.value, dict):
            continue
        patch = group.value.get("layer")
        if patch is None:
            merged = copy.deepcopy(layer)
            merged.key_origin = group.origin
        elif isinstance(patch.value, dict):
            merged = merge(copy.deepcopy(layer), patch)
        else:
            continue  # the schema reports the wrong type
        group.value["layer"] = merged


def _finish(tree: Sourced, overrides: tuple[str, ...] | list[str]) -> Sourced:
    """Apply every override (collecting all problems), then expand layer groups."""
    problems: list[Diagnostic] = []
    for token in overrides:
        try:
            apply_override(tree, token)
        except SpecError as e:
            problems.extend(e.diagnostics)
    if problems:
        raise SpecError(problems)
    expand_groups(tree)
    return tree


def compose(path: Path, overrides: tuple[str, ...] | list[str] = ()) -> Sourced:
    """Load ``path`` with its ``extends:``, apply ``overrides``, then expand groups."""
    return _finish(load_composed(path), overrides)


def compose_data(data: dict, overrides: tuple[str, ...] | list[str] = (), name: str = "<dict>") -> Sourced:
    """Like :func:`compose` for a spec given as a Python dict (no ``extends:``)."""
    tree = from_plain(copy.deepcopy(data), Origin(name))
    if isinstance(tree.value, dict) and "extends" in tree.value:
        raise spec_error(Origin(name), "extends", "`extends` needs a spec file, not a dict")
    return _finish(tree, overrides)
