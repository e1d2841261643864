"""Reading an artifact's ``manifest.json``: validated like a spec, versions checked, files verified.

:func:`read_manifest` checks that the directory holds the files ``moespec.load`` needs, that
the manifest parses and names the moespec artifact format, and validates it against
:class:`Manifest` (strict types; every wrong field listed in one :class:`ArtifactError`).

The compatibility rule (:func:`check_versions`, and the README):

- ``format_version`` must equal the reader's :data:`~moespec.runtime.layout.FORMAT_VERSION`
  (older: rebuild the artifact; newer: upgrade moespec).
- ``moespec_version`` must be of the reader's release series: the same ``MAJOR.MINOR``
  (patch releases load each other's artifacts; a layout change bumps ``format_version``).
- The torch, safetensors and python versions under ``versions`` are provenance only and
  never compared: safetensors files do not depend on them, and the op set check covers the
  kernels.

:func:`verify_files` compares the size and SHA-256 of the files ``load`` reads with those the
manifest records (hash, then read: one streaming pass over each file before it is parsed);
:func:`check_unchanged` then makes sure no file was replaced or rewritten between its hash and
its read (same device, inode, size and modification time).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moespec import __version__
from moespec.errors import ArtifactError
from moespec.runtime.layout import FORMAT, FORMAT_VERSION, MANIFEST, REQUIRED, sha256_file

_SHA256 = r"^[0-9a-f]{64}$"
_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.|$)")  # MAJOR.MINOR of a version string
_PATTERNS = {_SHA256: "64 lowercase hex digits", _RELEASE.pattern: "a version MAJOR.MINOR[.PATCH...]"}


class FileEntry(BaseModel):
    """Size and SHA-256 of one file of the artifact, as written by the build."""

    model_config = ConfigDict(strict=True, extra="forbid")
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)


class Manifest(BaseModel):
    """The fields of ``manifest.json`` that moespec reads, strictly typed.

    Other fields (``versions``, ``source``, ``weights``, ...) are allowed and kept: they are
    provenance for people and tools, and nothing ``load`` does depends on them.
    """

    model_config = ConfigDict(strict=True, extra="allow")
    format: Literal["moespec-artifact"]
    format_version: int
    moespec_version: str = Field(pattern=_RELEASE.pattern)
    op_set: list[str]
    spec_name: str
    spec_sha256: str = Field(pattern=_SHA256)
    layer: str = Field(min_length=1)
    seed: int = Field(ge=0)
    target: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry]


def _field_problem(e: Any) -> str:
    """One line for one pydantic error: the field's dotted path and what is wrong with it."""
    where = ".".join(str(p) for p in e["loc"]) or "(top level)"
    if e["type"] == "missing":
        return f"{where}: missing"
    value = repr(e.get("input"))
    value = value if len(value) <= 40 else value[:37] + "..."
    if e["type"] == "string_pattern_mismatch":
        return f"{where}: expected {_PATTERNS[e['ctx']['pattern']]}, got {value}"
    return f"{where}: {e['msg'][0].lower()}{e['msg'][1:]}, got {value}"


def read_manifest(root: Path) -> Manifest:
    """The validated manifest of artifact ``root``; :class:`ArtifactError` if it is missing,
    malformed, of another format version or from another moespec release series."""
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (it does not exist or is not a directory)")
    missing = [name for name in REQUIRED if not (root / name).is_file()]
    if missing:
        raise ArtifactError(
            f"{root}: incomplete artifact, missing {', '.join(missing)} (rebuild it with `moespec build`)"
        )
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a moespec artifact manifest (expected format {FORMAT!r})")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        problems = [_field_problem(e) for e in err.errors(include_url=False)]
        raise ArtifactError(
            f"{path}: invalid manifest ({len(problems)} problem{'s' if len(problems) > 1 else ''}; "
            "rebuild the artifact with `moespec build`)\n" + "\n".join(f"  {p}" for p in problems)
        ) from None
    check_versions(manifest, path)
    return manifest


def check_versions(manifest: Manifest, path: Path) -> None:
    """Raise unless this moespec reads the manifest's format version and release series."""
    version = manifest.format_version
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is newer than this moespec reads "
            f"({FORMAT_VERSION}); upgrade moespec"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is older than this moespec reads "
            f"({FORMAT_VERSION}); rebuild it from its spec.lock.yaml with `moespec build`"
        )
    theirs, ours = release(manifest.moespec_version), release(__version__)
    if theirs != ours:
        raise ArtifactError(
            f"{path}: built by moespec {manifest.moespec_version}, a release series ({theirs}) other "
            f"than this moespec {__version__} ({ours}); rebuild it from its spec.lock.yaml with "
            "`moespec build`, or load it with that moespec"
        )


def release(version: str) -> str:
    """``MAJOR.MINOR`` of a version string (the release series artifacts are compatible within)."""
    m = _RELEASE.match(version)
    return f"{m[1]}.{m[2]}" if m else version


Fingerprint = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def fingerprint(path: Path) -> Fingerprint:
    """What changes when a file is replaced or rewritten (a symlink is followed)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def verify_files(root: Path, manifest: Manifest, names: tuple[str, ...]) -> dict[str, Fingerprint]:
    """Raise unless each file ``names`` of ``root`` has the size and SHA-256 the manifest records.

    Every file is checked and every mismatch listed at once. The size is compared first, so a
    truncated or swapped file of another size costs no hashing; otherwise the file is hashed
    in one streaming pass (:func:`~moespec.runtime.layout.sha256_file`). A symlink is followed:
    what counts is the bytes ``load`` would read. Returns each file's :func:`fingerprint`
    taken before it was hashed, for :func:`check_unchanged` after it was read.
    """
    problems, prints = [], {}
    for name in names:
        entry = manifest.files.get(name)
        if entry is None:
            problems.append(f"{name}: no size and sha256 recorded in {MANIFEST}")
            continue
        path = root / name
        prints[name] = fingerprint(path)
        size = prints[name][2]
        if size != entry.bytes:
            problems.append(f"{name}: {size} bytes, the manifest records {entry.bytes}")
            continue
        actual = sha256_file(path)
        if actual != entry.sha256:
            problems.append(f"{name}: sha256 {actual[:12]}..., the manifest records {entry.sha256[:12]}...")
    if problems:
        raise ArtifactError(
            f"{root}: files differ from what {MANIFEST} records (changed or replaced since the build)\n"
            + "\n".join(f"  {p}" for p in problems)
            + "\nRebuild the artifact with `moespec build`; to load files edited on purpose, pass "
            "verify=False to moespec.load"
        )
    return prints


def check_unchanged(root: Path, prints: dict[str, Fingerprint]) -> None:
    """Raise if a file verified by :func:`verify_files` was replaced or rewritten since."""
    changed = [name for name, before in prints.items() if fingerprint(root / name) != before]
    if changed:
        raise ArtifactError(
            f"{root}: {', '.join(changed)} changed while the artifact was being loaded (after its "
            "sha256 was checked); load it again once nothing writes to it"
        )
