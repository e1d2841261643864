"""YAML loading that keeps a position for every value.

PyYAML's defaults are wrong for a spec language: a duplicate key silently wins, ``no``/``on``
become booleans (YAML 1.1) and ``1e-3`` stays a string. This loader resolves plain scalars
with the YAML 1.2 core schema (what editors using yaml-language-server assume), rejects
duplicate keys and explicit tags, and returns a :class:`Sourced` tree whose every node
remembers its :class:`~moespec.errors.Origin`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from moespec.errors import Diagnostic, Origin, SpecError, spec_error

Path_ = tuple[str | int, ...]

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Resolver(yaml.resolver.BaseResolver):
    """Resolves plain scalars by the YAML 1.2 core schema only (no 1.1 booleans, no dates)."""

    yaml_implicit_resolvers: ClassVar[dict] = {}


for _tag, _rx, _first in [
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:merge", re.compile(r"^<<$"), ["<"]),
]:
    _Resolver.add_implicit_resolver(_tag, _rx, _first)


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    _Resolver,
):
    """A composer only: we build Python values ourselves to keep the positions."""

    def __init__(self, stream: str, file: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)
        self.file = file
        self.nodes = 0

    def compose_node(self, parent, index):
        # Count nodes as they are composed, so a huge document stops here, early, instead of
        # after composing all of it (400k keys took 21 s and 650 MB before the build's check).
        self.nodes += 1
        if self.nodes > MAX_NODES:
            event = self.peek_event()
            raise spec_error(
                _origin(event.start_mark, self.file),
                "",
                f"the document has more than {MAX_NODES} YAML values (a spec has a few hundred); "
                "is this the right file?",
            )
        # Explicit tags (`!!int "x"`, `!!python/object:...`, `!custom`) are not part of the
        # spec language: reject them instead of letting them coerce or be ignored.
        if self.check_event(yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent):
            event = self.peek_event()
            if event.tag not in (None, "!"):
                shown = event.tag.replace("tag:yaml.org,2002:", "!!")
                raise spec_error(
                    _origin(event.start_mark, self.file),
                    "",
                    f"explicit YAML tags are not supported (found {shown})",
                )
        return super().compose_node(parent, index)


@dataclass
class Sourced:
    """A YAML value with its origin. ``value`` is a dict/list of Sourced, or a scalar."""

    value: Any
    origin: Origin
    key_origin: Origin | None = None
    children_from: dict[str, Origin] = field(default_factory=dict)

    def plain(self) -> Any:
        """The value as plain Python data (dicts, lists, scalars)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value

    def get(self, path: Path_) -> Sourced | None:
        """The node at ``path``, or None if any step is missing."""
        node: Sourced | None = self
        for part in path:
            if node is None:
                return None
            if isinstance(node.value, dict) and isinstance(part, str):
                node = node.value.get(part)
            elif isinstance(node.value, list) and isinstance(part, int):
                node = node.value[part] if 0 <= part < len(node.value) else None
            else:
                return None
        return node


def from_plain(value: Any, origin: Origin) -> Sourced:
    """Wrap plain data, giving every node the same origin (used for CLI overrides)."""
    if isinstance(value, dict):
        return Sourced({k: from_plain(v, origin) for k, v in value.items()}, origin, origin)
    if isinstance(value, list):
        return Sourced([from_plain(v, origin) for v in value], origin)
    return Sourced(value, origin)


def _origin(mark: yaml.Mark, file: str) -> Origin:
    return Origin(file, mark.line + 1, mark.column + 1)


def _scalar(node: yaml.ScalarNode, file: str) -> Any:
    tag, text = node.tag, node.value
    if tag == "tag:yaml.org,2002:str":
        return text
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return text.lower() == "true"
    if tag == "tag:yaml.org,2002:int":
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)
    if tag == "tag:yaml.org,2002:float":
        low = text.lower().lstrip("+")
        if low.endswith("inf"):
            return -math.inf if low.startswith("-") else math.inf
        return math.nan if low == ".nan" else float(text)
    raise spec_error(_origin(node.start_mark, file), "", f"unsupported YAML tag {tag!r}")


MAX_NODES = 100_000  # values in a document, as written and after alias expansion ("billion laughs")


class _Builder:
    """Turns a composed node tree into a Sourced tree, collecting every problem."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Diagnostic] = []
        self.active: set[int] = set()  # nodes being built: a repeat is a recursive alias
        self.count = 0

    def build(self, node: yaml.Node, path: Path_) -> Sourced:
        origin = _origin(node.start_mark, self.file)
        self.count += 1
        if self.count > MAX_NODES:
            raise spec_error(
                origin,
                _dotted(path),
                f"aliases expand the document to more than {MAX_NODES} values (an alias bomb?)",
            )
        if id(node) in self.active:
            raise spec_error(origin, _dotted(path), "recursive alias (a value that contains itself)")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path, origin)
        self.active.add(id(node))
        try:
            return self._collection(node, path, origin)
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: Path_, origin: Origin) -> Sourced:
        try:
            return Sourced(_scalar(node, self.file), origin)
        except SpecError as e:
            self.problems.extend(Diagnostic(d.origin, _dotted(path), d.message) for d in e.diagnostics)
            return Sourced(None, origin)

    def _collection(self, node: yaml.Node, path: Path_, origin: Origin) -> Sourced:
        if isinstance(node, yaml.SequenceNode):
            return Sourced([self.build(n, (*path, i)) for i, n in enumerate(node.value)], origin)
        assert isinstance(node, yaml.MappingNode)
        return self._mapping(node, path, origin)

    def _mapping(self, node: yaml.MappingNode, path: Path_, origin: Origin) -> Sourced:
        out: dict[str, Sourced] = {}
        merged: set[str] = set()  # keys from `<<:` merges may be overridden explicitly
        for key_node, value_node in node.value:
            key_origin = _origin(key_node.start_mark, self.file)
            if key_node.tag == "tag:yaml.org,2002:merge":
                for src in self._merge_sources(value_node, path):
                    for k, v in src.value.items():
                        if k not in out:
                            out[k] = v
                            merged.add(k)
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                if isinstance(key_node, yaml.ScalarNode):
                    got = f"{key_node.value!r} ({key_node.tag.rsplit(':', 1)[-1]}); quote it"
                else:
                    got = "a sequence" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
                self.problems.append(
                    Diagnostic(key_origin, _dotted(path), f"mapping keys must be strings, got {got}")
                )
                continue
            key = key_node.value
            if key in out and key not in merged:
                first = out[key].key_origin
                self.problems.append(
                    Diagnostic(
                        key_origin,
                        _dotted((*path, key)),
                        f"duplicate key {key!r} (first defined at {first})",
                    )
                )
                continue
            merged.discard(key)
            child = self.build(value_node, (*path, key))
            child.key_origin = key_origin
            out[key] = child
        return Sourced(out, origin)

    def _merge_sources(self, node: yaml.Node, path: Path_) -> list[Sourced]:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        sources = [self.build(n, path) for n in nodes]
        bad = [s for s in sources if not isinstance(s.value, dict)]
        for s in bad:
            self.problems.append(Diagnostic(s.origin, _dotted(path), "`<<` merge needs a mapping"))
        return [s for s in sources if isinstance(s.value, dict)]


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def load_text(text: str, file: str) -> Sourced:
    """Parse one YAML document into a Sourced tree; raise SpecError on any problem."""
    if "\x00" in text:
        raise spec_error(
            _text_origin(text, text.index("\x00"), file), "", "not a YAML text file (contains NUL bytes)"
        )
    try:
        loader = _Loader(text, file)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as e:
        what = f"U+{e.character:04X}" if isinstance(e.character, int) else repr(e.character)
        raise spec_error(
            _text_origin(text, e.position, file), "", f"control character {what} is not allowed in YAML"
        ) from None
    except RecursionError:
        raise spec_error(Origin(file), "", "the document is nested too deeply") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        origin = _origin(mark, file) if mark else Origin(file)
        msg = " ".join(p for p in (e.context, e.problem) if p) or str(e)
        raise spec_error(origin, "", f"invalid YAML: {msg}") from None
    except yaml.YAMLError as e:
        raise spec_error(Origin(file), "", f"invalid YAML: {e}") from None
    if node is None:
        raise spec_error(Origin(file), "", "the file is empty; a spec starts with `moespec: 1`")
    builder = _Builder(file)
    try:
        tree = builder.build(node, ())
    except RecursionError:
        raise spec_error(Origin(file), "", "the document is nested too deeply") from None
    if builder.problems:
        raise SpecError(builder.problems)
    return tree


def _text_origin(text: str, pos: int, file: str) -> Origin:
    line = text.count("\n", 0, pos) + 1
    return Origin(file, line, pos - (text.rfind("\n", 0, pos) + 1) + 1)


def load_file(path: Path) -> Sourced:
    """Read and parse a spec file; unreadable or non-UTF-8 files are a SpecError."""
    shown = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise spec_error(Origin(shown), "", "file not found") from None
    except IsADirectoryError:
        raise spec_error(Origin(shown), "", "is a directory, not a spec file") from None
    except OSError as e:
        raise spec_error(Origin(shown), "", f"cannot read file: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise spec_error(
            Origin(shown, line, col), "", f"not a UTF-8 text file (bad byte 0x{data[e.start]:02x})"
        ) from None
    return load_text(text, shown)


def parse_scalar_text(text: str, origin: Origin) -> Any:
    """Parse a CLI override's right-hand side as YAML (so `[1, 2]` and `1e-3` work).

    ``origin`` points at the first character of ``text`` inside the override token; errors
    are re-anchored there so they show the whole override with a caret.
    """
    if not text.strip():
        return ""
    try:
        return load_text(text, origin.file).plain()
    except SpecError as e:
        raise SpecError(
            [
                Diagnostic(
                    Origin(origin.file, 1, origin.col + (d.origin.col - 1 if d.origin else 0), origin.text),
                    d.path,
                    d.message,
                )
                for d in e.diagnostics
            ]
        ) from None
