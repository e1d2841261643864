"""Fuzz the loader/validator: mutated example specs and random overrides never crash the CLI.

Every ``specs/*.yaml`` (globbed at test time, so new example specs are fuzzed too) is mutated
(lines deleted, duplicated or re-indented, characters swapped, values replaced by nasty YAML
tokens, bytes inserted, text truncated) and validated in-process. The only acceptable
outcomes are exit code 0 (still valid) or 1 (compiler-style diagnostics); any exception is a
bug. The runs are bounded (about 150 examples, well under 30 s) and derandomized, so CI is
reproducible; set MOESPEC_FUZZ_EXAMPLES=5000 MOESPEC_FUZZ_RANDOM=1 for a longer, fresh hunt.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moespec.cli import main

SPECS = Path(__file__).resolve().parents[1] / "specs"
EXAMPLES = int(os.environ.get("MOESPEC_FUZZ_EXAMPLES", "150"))
RANDOM = os.environ.get("MOESPEC_FUZZ_RANDOM") == "1"

TOKENS = [
    "-1", "0", '"8"', "yes", "[]", "{}", "null", "1e400", ".nan", "!!binary AA==", "\x00", "&a", "*a",
    "no", "~", ".inf", "-.inf", "0x10", "0o17", "1_000", "2001-01-01", "true", "1.5", "-0",
    '"', "'", "[", "{", "]", "}", ": x", "- y", "? x", "|", ">-", "#", "\t", "%YAML 1.1", "---",
    "...", "<<: *a", "!!str", "!custom x", '"\\ud800"', "\ufeff", "\u2028", "\x85", "\r", "é",
    "a" * 300, "99999999999999999999999999", "[" * 50,
]  # fmt: skip

COUNT_LINE = re.compile(r"^\d+ errors? found$")
KEY_LINE = re.compile(rb"^(\s*(?:- )?[^:#\n]+:)(.*)$")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of specs/ (so relative `extends:` keep working while we mutate files)."""
    files = sorted(SPECS.glob("*.yaml"))
    assert files, "no example specs to fuzz"
    out = tmp_path_factory.mktemp("fuzz") / "specs"
    shutil.copytree(SPECS, out)
    return out


def _validate(cwd: Path, args: list[str]) -> tuple[int, str, str]:
    """Run ``moespec validate`` in-process; any exception but SystemExit propagates (a failure)."""
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(["validate", *args])
            except SystemExit as e:  # allowed to leave, but must carry a valid code
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def _check_outcome(rc: int, out: str, err: str) -> None:
    assert rc in (0, 1), f"exit code {rc}\n{err}"
    assert "Traceback" not in err
    if rc == 1:
        last = err.rstrip("\n").rsplit("\n", 1)[-1]
        assert COUNT_LINE.match(last) or err.startswith("moespec: error:"), f"bad stderr:\n{err}"


# --- mutations: each takes the file bytes and hypothesis' data, returns new bytes -----------


def _line_index(data: st.DataObject, lines: list[bytes]) -> int:
    return data.draw(st.integers(0, max(len(lines) - 1, 0)), label="line")


def _delete_line(text: bytes, data: st.DataObject) -> bytes:
    lines = text.split(b"\n")
    del lines[_line_index(data, lines)]
    return b"\n".join(lines)


def _duplicate_line(text: bytes, data: st.DataObject) -> bytes:
    lines = text.split(b"\n")
    i = _line_index(data, lines)
    lines.insert(i, lines[i])
    return b"\n".join(lines)


def _swap_chars(text: bytes, data: st.DataObject) -> bytes:
    if len(text) < 2:
        return text
    i = data.draw(st.integers(0, len(text) - 2), label="swap at")
    return text[:i] + text[i + 1 : i + 2] + text[i : i + 1] + text[i + 2 :]


def _replace_value(text: bytes, data: st.DataObject) -> bytes:
    lines = text.split(b"\n")
    keyed = [i for i, line in enumerate(lines) if KEY_LINE.match(line) and not line.lstrip().startswith(b"#")]
    if not keyed:
        return text
    i = data.draw(st.sampled_from(keyed), label="value line")
    token = data.draw(st.sampled_from(TOKENS), label="token")
    m = KEY_LINE.match(lines[i])
    assert m
    lines[i] = m.group(1) + b" " + token.encode("utf-8")
    return b"\n".join(lines)


def _truncate(text: bytes, data: st.DataObject) -> bytes:
    return text[: data.draw(st.integers(0, len(text)), label="truncate at")]


def _insert_bytes(text: bytes, data: st.DataObject) -> bytes:
    i = data.draw(st.integers(0, len(text)), label="insert at")
    return text[:i] + data.draw(st.binary(min_size=1, max_size=8), label="bytes") + text[i:]


def _reindent(text: bytes, data: st.DataObject) -> bytes:
    lines = text.split(b"\n")
    i = _line_index(data, lines)
    shift = data.draw(st.sampled_from([-4, -2, -1, 1, 2, 4]), label="indent shift")
    body = lines[i].lstrip(b" ")
    indent = len(lines[i]) - len(body)
    lines[i] = b" " * max(indent + shift, 0) + body
    return b"\n".join(lines)


MUTATIONS: list[Callable[[bytes, st.DataObject], bytes]] = [
    _delete_line,
    _duplicate_line,
    _swap_chars,
    _replace_value,
    _replace_value,  # twice: the most interesting one
    _truncate,
    _insert_bytes,
    _reindent,
]


def _fuzz_settings(share: float) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES * share)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_fuzz_settings(0.7)
@given(data=st.data())
def test_mutated_specs_never_crash(scratch: Path, data: st.DataObject) -> None:
    files = sorted(p.name for p in scratch.glob("*.yaml"))
    name = data.draw(st.sampled_from(files), label="spec")
    original = (scratch / name).read_bytes()
    text = original
    for _ in range(data.draw(st.integers(1, 3), label="n mutations")):
        text = data.draw(st.sampled_from(MUTATIONS), label="mutation")(text, data)
    # Validate the mutated file and every spec extending it (errors then point into it).
    dependents = [
        f for f in files if f != name and re.search(rf"extends:.*\b{re.escape(name)}\b", _text(scratch / f))
    ]
    (scratch / name).write_bytes(text)
    try:
        for target in [name, *dependents]:
            _check_outcome(*_validate(scratch, [target]))
    finally:
        (scratch / name).write_bytes(original)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --- overrides: random paths from a spec's own keys, random ops and values --------------------


def _paths(node: object, prefix: str = "") -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out += [p, *_paths(v, p)]
    elif isinstance(node, list):
        for i, v in enumerate(node):
            p = f"{prefix}.{i}"
            out += [p, *_paths(v, p)]
    return out


def _spec_paths(path: Path) -> list[str]:
    import yaml

    try:
        return _paths(yaml.safe_load(path.read_text(encoding="utf-8"))) or ["name"]
    except yaml.YAMLError:
        return ["name"]


@_fuzz_settings(0.3)
@given(data=st.data())
def test_random_overrides_never_crash(scratch: Path, data: st.DataObject) -> None:
    files = sorted(p.name for p in scratch.glob("*.yaml"))
    name = data.draw(st.sampled_from(files), label="spec")
    paths = [*_spec_paths(scratch / name), "nosuch", "layer.nosuch.deeper", "layer.experts.routed.9"]
    overrides = []
    for _ in range(data.draw(st.integers(1, 3), label="n overrides")):
        path = data.draw(st.sampled_from(paths), label="path")
        path += data.draw(st.sampled_from(["", "", ".x", ".0", "..", ".1"]), label="suffix")
        op = data.draw(st.sampled_from(["", "", "+", "~"]), label="op")
        value = data.draw(st.sampled_from([t for t in TOKENS if "\x00" not in t]), label="value")
        overrides.append(f"~{path}" if op == "~" else f"{op}{path}={value}")
    _check_outcome(*_validate(scratch, [name, *overrides]))
