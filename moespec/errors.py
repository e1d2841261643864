"""User-facing errors that print like a compiler: ``file:line:col: path: message``.

Every problem found in a spec becomes a :class:`Diagnostic` that knows where the offending
value came from (a file position or a command-line override). :class:`SpecError` carries
all of them at once, so a user fixes every problem in one pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Origin:
    """Where a value came from.

    ``file`` is a path for values read from YAML, or ``"<cli>"`` for command-line overrides,
    in which case ``text`` holds the override token. ``line`` and ``col`` are 1-based.
    """

    file: str
    line: int = 1
    col: int = 1
    text: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def source_line(self) -> str | None:
        """The text of the line this origin points into, if it can be read."""
        if self.text is not None:
            return self.text
        try:
            lines = Path(self.file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        return lines[self.line - 1] if 0 < self.line <= len(lines) else None


@dataclass(frozen=True)
class Diagnostic:
    """One problem: where it is, which spec path, and what is wrong."""

    origin: Origin | None
    path: str
    message: str

    def format(self, *, snippet: bool = True) -> str:
        """Compiler-style text: a header line, then the source line with a caret."""
        where = f"{self.origin}: " if self.origin else ""
        path = f"{self.path}: " if self.path else ""
        head = f"{where}{path}{self.message}"
        if not snippet or self.origin is None:
            return head
        src = self.origin.source_line()
        if src is None:
            return head
        # Control characters (NUL, bell, ...) would garble the terminal: show them as U+FFFD.
        src = "".join(c if c == "\t" or (c >= " " and c != "\x7f") else "\ufffd" for c in src)
        caret = "".join(c if c == "\t" else " " for c in src[: self.origin.col - 1]) + "^"
        return f"{head}\n    {src}\n    {caret}"

    def to_json(self) -> dict[str, object]:
        """A machine-readable form for ``--json`` output."""
        o = self.origin
        return {
            "file": o.file if o else None,
            "line": o.line if o else None,
            "col": o.col if o else None,
            "path": self.path,
            "message": self.message,
        }


class MoespecError(Exception):
    """Base class of errors moespec reports to users."""


@dataclass
class SpecError(MoespecError):
    """A spec could not be loaded or validated; holds every problem found."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.format(snippet=False))

    def format(self, *, snippet: bool = True) -> str:
        """All diagnostics, one block each, followed by a count."""
        blocks = [d.format(snippet=snippet) for d in self.diagnostics]
        n = len(self.diagnostics)
        blocks.append(f"{n} error{'s' if n != 1 else ''} found")
        return "\n".join(blocks)

    def __str__(self) -> str:
        return self.format(snippet=False)


def spec_error(origin: Origin | None, path: str, message: str) -> SpecError:
    """Shorthand for a :class:`SpecError` with a single diagnostic."""
    return SpecError([Diagnostic(origin, path, message)])


class BuildError(MoespecError):
    """A valid spec could not be built as asked (e.g. an unknown layer group name)."""


class TargetError(BuildError):
    """A valid spec asks for a target this machine or build cannot provide (a CUDA device that
    is absent, a GPU architecture that does not match, a backend not implemented yet, expert
    parallelism without a mesh). ``path`` is the spec field, e.g. ``target.device``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class ArtifactError(MoespecError):
    """An artifact directory cannot be written (target exists) or read (missing, corrupted,
    edited, or built for a different spec/layer)."""


class OutputError(MoespecError):
    """A file or directory could not be written: the operating system refused (permission
    denied, not a directory, disk full, ...). ``path`` is what the user asked to write."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: cannot write: {reason}")

    @classmethod
    def from_os(cls, path: str | Path, err: OSError) -> OutputError:
        """The error for ``err`` raised while writing ``path``; the OS's reason, plus the
        file it concerned when that is not ``path`` itself or one of its hidden temporaries."""
        reason = err.strerror or str(err) or type(err).__name__
        name = err.filename
        if name is not None and not _is_temp_of(Path(os.fsdecode(name)), Path(path)):
            reason = f"{reason}: {os.fsdecode(name)}"
        return cls(path, reason)


def _is_temp_of(name: Path, path: Path) -> bool:
    """``name`` is ``path``, inside it, or inside a hidden ``.NAME.*`` sibling moespec writes
    first (saying so would only confuse: the user asked for ``path``)."""
    if name == path or path in name.parents:
        return True
    temp = f".{path.name}."
    return any(q.parent == path.parent and q.name.startswith(temp) for q in (name, *name.parents))


class IRError(MoespecError):
    """An IR invariant does not hold (an internal error; please report it)."""
