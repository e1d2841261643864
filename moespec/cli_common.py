"""Helpers the ``moespec`` command line's modules share: telling spec files from overrides,
usage errors, printing spec errors, the progress bar."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from moespec.errors import SpecError

_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_0-9]+)+$")  # a.b.c, no "=", no "/"
_SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_OVERRIDE = re.compile(r"^(?:[+~][A-Za-z_0-9]|[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_0-9]+)*=)")


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate spec paths from ``a.b=v`` / ``+a.b=v`` / ``~a.b`` overrides. A dotted key
    that is no file (``layer.router.k``) is an override missing its ``=value``: exit 2 with
    that hint, not "file not found" after the real spec printed "ok"."""
    specs, overrides = [], []
    for item in items:
        looks_like = bool(_OVERRIDE.match(item)) or "=" in item or item[:1] in ("+", "~")
        (overrides if looks_like and not _is_file(item) else specs).append(item)
    for item in specs:
        if _BARE_KEY.match(item) and not item.endswith(_SPEC_SUFFIXES) and not _is_file(item):
            raise SystemExit(
                _usage(f"moespec: {item!r} looks like an override without a value: write {item}=VALUE")
            )
    return specs, overrides


def _is_file(item: str) -> bool:
    try:
        return Path(item).exists()
    except OSError:  # e.g. a name too long for the file system: not a file
        return False


def _report(err: SpecError, as_json: bool, file: str | None = None) -> None:
    if as_json:
        print(
            json.dumps(
                {"file": file, "ok": False, "errors": [d.to_json() for d in err.diagnostics]}, indent=2
            )
        )
    else:
        print(err.format(), file=sys.stderr)


def _one_spec(args: argparse.Namespace, what: str = "spec file") -> tuple[str, list[str]] | int:
    """``(spec, overrides)`` when ``args.items`` name exactly one ``what``; otherwise the usage
    error is printed and its exit code returned."""
    specs, overrides = _split_args(args.items)
    if len(specs) != 1:
        return _usage(f"moespec {args.command}: give exactly one {what} (got {len(specs)})")
    return specs[0], overrides


def _usage(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def _bench_progress(enabled: bool):
    """A rich progress bar on stderr when it is a terminal; otherwise nothing."""
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
