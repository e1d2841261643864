"""Access to the data shipped beside the package: schemas/, specs/ and templates/.

In a wheel these directories are force-included as ``moespec/_data/<name>``; in a source
checkout (editable install, tests) they sit at the repository root.
"""

from __future__ import annotations

from pathlib import Path


def data_dir(name: str) -> Path:
    """Directory ``name`` (``schemas``, ``specs`` or ``templates``) of the installed data."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"moespec data directory {name!r} is missing from the installation")


def schema_path() -> Path:
    """The shipped JSON Schema file."""
    return data_dir("schemas") / "moespec.v1.schema.json"
