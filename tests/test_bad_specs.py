"""Golden tests of the diagnostics printed for invalid specs and command-line overrides.

Every ``tests/bad_specs/NAME.yaml`` and ``tests/bad_specs/checks/NAME.yaml`` is validated
with the CLI (in-process, cwd = the ``bad_specs`` folder, so file names in the output are
relative and stable); stderr must equal ``NAME.expected`` next to it, paths included.
``checks/`` holds one spec per semantic check (``test_every_semantic_check_has_a_golden``
fails for a check none of the goldens triggers). Files under ``bad_specs/parts/`` are
helpers (extended or overridden), not cases. Override cases live in ``OVERRIDE_CASES``
with goldens in ``bad_specs/overrides/``.

Regenerate the goldens after an intended change of wording with::

    MOESPEC_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_bad_specs.py

and read the diff: a golden is a review of the message, not a snapshot to accept blindly.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

import moespec
import moespec.spec
from moespec.cli import main

BAD = Path(__file__).parent / "bad_specs"
OVERRIDE_GOLDEN = BAD / "overrides"
UPDATE = os.environ.get("MOESPEC_UPDATE_GOLDEN") == "1"
# `extends` cycles are reported with resolved (absolute) paths; keep goldens machine-independent.
ABS_PREFIX = str(BAD.resolve()) + os.sep
ABS_PLACEHOLDER = "$BAD_SPECS/"

CASES = sorted(p.relative_to(BAD).as_posix() for p in [*BAD.glob("*.yaml"), *BAD.glob("checks/*.yaml")])

# A diagnostic header: `file:line:col: [path: ]message` (file may be `<cli>`).
HEADER = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<rest>.+)$")
COUNT = re.compile(r"^(?P<n>\d+) errors? found$")


def _run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    monkeypatch.chdir(BAD)
    capsys.readouterr()  # drop anything printed before
    rc = main(["validate", *args])
    out, err = capsys.readouterr()
    return rc, out, err.replace(ABS_PREFIX, ABS_PLACEHOLDER)


def _read(path: Path) -> str:
    with path.open(encoding="utf-8", newline="") as f:
        return f.read()


def _check_golden(golden: Path, err: str) -> None:
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        with golden.open("w", encoding="utf-8", newline="") as f:
            f.write(err)
        return
    if not golden.exists():
        pytest.fail(f"no golden {golden.relative_to(BAD.parent)}; run with MOESPEC_UPDATE_GOLDEN=1")
    assert err == _read(golden)


def _check_shape(err: str) -> list[re.Match]:
    """stderr is compiler style: headers (each maybe with a source line and caret), then a count."""
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    count = COUNT.match(lines[-1])
    assert count, f"last line should be 'N errors found': {lines[-1]!r}"
    headers = []
    i = 0
    while i < len(lines) - 1:
        m = HEADER.match(lines[i])
        assert m, f"expected a `file:line:col: message` header, got {lines[i]!r}"
        headers.append(m)
        i += 1
        if i < len(lines) - 1 and lines[i].startswith("    ") and not HEADER.match(lines[i]):
            src, caret = lines[i], lines[i + 1]
            assert caret.strip() == "^", f"a source line must be followed by a caret: {caret!r}"
            col = int(m["col"])
            assert caret == "    " + " " * (col - 1) + "^", f"caret is not at column {col}"
            assert col - 1 <= len(src) - 4, f"column {col} is past the end of {src!r}"
            i += 2
    assert int(count["n"]) == len(headers), "the count does not match the number of errors"
    return headers


@pytest.mark.parametrize("name", CASES)
def test_bad_spec(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    rc, out, err = _run_cli([name], monkeypatch, capsys)
    assert rc == 1
    assert out == ""
    assert "Traceback" not in err
    _check_golden(BAD / name.replace(".yaml", ".expected"), err)


# Goldens that record current, known-bad output (see the test report); their shape test
# XPASSes once moespec/ is fixed, and the entry must then be removed.
KNOWN_BAD_SHAPE: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BAD_SHAPE[n]))
        if n in KNOWN_BAD_SHAPE
        else n
        for n in CASES
    ],
)
def test_bad_spec_shape(name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Compiler style: `file:line:col: message`, source line, caret at col, `N errors found`."""
    _, _, err = _run_cli([name], monkeypatch, capsys)
    _check_shape(err)


def test_every_golden_has_a_case() -> None:
    goldens = [*BAD.glob("*.expected"), *BAD.glob("checks/*.expected")]
    stale = {p.relative_to(BAD).with_suffix("").as_posix() for p in goldens}
    stale -= {c.removesuffix(".yaml") for c in CASES}
    stale |= {p.stem for p in OVERRIDE_GOLDEN.glob("*.expected")} - set(OVERRIDE_CASES)
    assert not stale, f"goldens without a case: {sorted(stale)}"


def test_enough_cases() -> None:
    assert len(CASES) >= 26 + 51


# --- every semantic check is triggered by some golden -------------------------------------

SPEC_PKG = Path(moespec.spec.__file__).parent


@dataclass(frozen=True)
class Site:
    """A statement that reports semantic problems: a ``yield`` / ``yield from`` in a function
    returning ``Problem``s (``checks``, ``_check_*``, ``unusable``, ...) or a
    ``problems.append((path, message))``."""

    file: str
    first: int
    last: int
    source: str

    def __str__(self) -> str:
        return f"{Path(self.file).relative_to(SPEC_PKG.parents[1])}:{self.first}: {self.source}"


def _problem_sites() -> list[Site]:
    sites = []
    for f in sorted(SPEC_PKG.rglob("*.py")):
        for fn in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(fn, ast.FunctionDef) or fn.returns is None:
                continue
            if "Problem" not in ast.unparse(fn.returns):
                continue
            for node in ast.walk(fn):
                appends = (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "append"
                    and bool(node.args)
                    and isinstance(node.args[0], ast.Tuple)
                )
                if isinstance(node, (ast.Yield, ast.YieldFrom)) or appends:
                    text = ast.unparse(node).strip("()")
                    sites.append(Site(str(f), node.lineno, node.end_lineno or node.lineno, text[:90]))
    return sites


def _reported_lines(cases: list[str]) -> set[tuple[str, int]]:
    """``(file, line)`` of every statement under moespec/spec that produced a problem while
    validating ``cases``: the line a generator frame yields a value from (for ``yield from``
    also the delegating frame's line), and every executed line (for ``append``)."""
    hits: set[tuple[str, int]] = set()
    prefix = str(SPEC_PKG)

    def local(frame: FrameType, event: str, arg: object) -> Callable | None:
        if (event == "return" and arg is not None) or event == "line":
            hits.add((frame.f_code.co_filename, frame.f_lineno, event))
        return local

    def scope(frame: FrameType, event: str, arg: object) -> Callable | None:
        return local if frame.f_code.co_filename.startswith(prefix) else None

    previous = sys.gettrace()
    try:
        for case in cases:
            sys.settrace(scope)
            try:
                moespec.load_spec(BAD / case)
            except moespec.SpecError:
                pass
            finally:
                sys.settrace(previous)
    finally:
        sys.settrace(previous)
    return hits


def test_every_semantic_check_has_a_golden() -> None:
    """Each site that reports a semantic problem fires for at least one bad-spec golden, so a
    new check needs a spec in ``bad_specs/checks/`` (and dropping a check fails a golden)."""
    sites = _problem_sites()
    assert len(sites) > 50, "the site finder no longer sees the checks; update _problem_sites"
    hits = _reported_lines(CASES)

    def fired(site: Site) -> bool:
        event = "line" if site.source.startswith("problems.append") else "return"
        return any((site.file, n, event) in hits for n in range(site.first, site.last + 1))

    missing = [str(s) for s in sites if not fired(s)]
    assert not missing, "semantic checks no golden triggers (add tests/bad_specs/checks/*.yaml):\n" + (
        "\n".join(missing)
    )


def test_several_errors_reported_at_once(monkeypatch, capsys) -> None:
    rc, _, err = _run_cli(["several_errors.yaml"], monkeypatch, capsys)
    assert rc == 1
    paths = [m["rest"].split(":")[0] for m in _check_shape(err)]
    assert paths == [
        "name",
        "d_model",
        "layer.experts.routed.0.kind",
        "layer.experts.routed.0.d_ff",
        "layer.router.temprature",
        "layer.losses.z_loss.weight",
        "target.dtype",
    ]


def _env() -> dict[str, str]:
    """The environment for `python -m moespec` run from another cwd: the checkout importable."""
    root = str(BAD.resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def test_subprocess_exit_code_and_no_traceback() -> None:
    """The real entry point: exit status 1, nothing on stdout, the golden on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "moespec", "validate", "several_errors.yaml", "binary_nul.yaml"],
        cwd=BAD,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    expected = "".join(_read(BAD / n) for n in ("several_errors.expected", "binary_nul.expected"))
    assert proc.stderr == expected


# --- command-line overrides (applied to the valid parts/tiny.yaml) --------------------------

OVERRIDE_CASES: dict[str, list[str]] = {
    "k_zero": ["layer.router.k=0"],
    "k_not_int": ["layer.router.k=abc"],
    "k_exceeds_experts": ["layer.router.k=5"],
    "k_bad_yaml": ["layer.router.k=[1, 2"],
    "delete_missing": ["~does.not.exist"],
    "set_unknown_key": ["nosuchkey=1"],
    "add_existing": ["+layer.router.k=3"],
    "add_unknown_key": ["+layer.router.capacity_factr=1.5"],
    "no_value": ["+layer.router.bias"],
    "index_past_end": ["layer.experts.routed.3.d_ff=128"],
    "key_inside_scalar": ["+layer.router.k.x=5"],
    "several": ["nosuchkey=1", "+layer.router.k=3", "~target.arch"],
}


@pytest.mark.parametrize("case", sorted(OVERRIDE_CASES))
def test_bad_override(case: str, monkeypatch, capsys) -> None:
    tokens = OVERRIDE_CASES[case]
    rc, out, err = _run_cli(["parts/tiny.yaml", *tokens], monkeypatch, capsys)
    assert rc == 1
    assert out == ""
    headers = _check_shape(err)
    lines = err.split("\n")
    for m in headers:
        assert m["file"] == "<cli>" and m["line"] == "1", f"should point at the override: {m[0]}"
        src = lines[lines.index(m[0]) + 1]
        assert src.startswith("    ") and src[4:] in tokens, f"the override is not shown: {src!r}"
    _check_golden(OVERRIDE_GOLDEN / f"{case}.expected", err)


def test_override_value_column(monkeypatch, capsys) -> None:
    """A bad value is pointed at exactly: column of the first character after `=`."""
    token = "layer.router.k=0"
    _, _, err = _run_cli(["parts/tiny.yaml", token], monkeypatch, capsys)
    col = token.index("=") + 2
    assert err.startswith(f"<cli>:1:{col}: layer.router.k: ")
    assert f"\n    {token}\n    {' ' * (col - 1)}^\n" in err


def test_valid_base_is_valid(monkeypatch, capsys) -> None:
    rc, out, err = _run_cli(["parts/tiny.yaml"], monkeypatch, capsys)
    assert (rc, err) == (0, "")
    assert out == "parts/tiny.yaml: ok (tiny)\n"


# --- regression guards: inputs that once crashed or were wrongly accepted ------------------

BASE = (BAD / "parts" / "tiny.yaml").read_text(encoding="utf-8")


def _with(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return BASE + "\n".join(lines) + "\n"


KNOWN_CRASHES = {
    "explicit_int_tag_non_number": _with("d_model: 32", 'd_model: !!int "abc"'),  # ValueError
    "explicit_float_tag_non_number": _with("d_model: 32", "d_model: !!float abc"),  # ValueError
    "recursive_alias": BASE + "x: &a [*a]\n",  # RecursionError in _Builder.build
    "deep_nesting": BASE + "x: " + "[" * 3000 + "]" * 3000 + "\n",  # RecursionError in PyYAML
}

KNOWN_WRONGLY_ACCEPTED = {
    "explicit_bool_tag_non_bool": _with("k: 2", 'k: 2\n    renormalize: !!bool "maybe"'),
    "infinite_temperature": _with("k: 2", "k: 2\n    temperature: 1e400"),
    "infinite_capacity_factor": _with(
        "k: 2", "k: 2\n  capacity: {kind: factor, train_factor: .inf, eval_factor: .inf}"
    ),
    "python_tag_on_mapping": _with("layer:", "layer: !!python/object:os.system"),
}


@pytest.mark.parametrize("case", sorted(KNOWN_CRASHES))
def test_former_crash(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(KNOWN_CRASHES[case], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["validate", spec.name])
    except Exception as e:  # the point: nothing escapes
        pytest.fail(f"{type(e).__name__} escaped: {e}"[:300])
    _, err = capsys.readouterr()
    assert rc == 1
    _check_shape(err)


@pytest.mark.parametrize("case", sorted(KNOWN_WRONGLY_ACCEPTED))
def test_former_wrongly_accepted(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(KNOWN_WRONGLY_ACCEPTED[case], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    rc = main(["validate", spec.name])
    _, err = capsys.readouterr()
    assert rc == 1
    _check_shape(err)


KNOWN_OVERRIDE_CRASHES = {
    # cli._split_args: Path(item).exists() raises OSError ENAMETOOLONG on Python 3.11
    "file_name_too_long": ["d_model=" + "1" * 300],
    # compose.apply_override: `del node.value[0]` on a mapping whose key is the string "0"
    "delete_numeric_key": ["+layer.0=1", "~layer.0"],
}


@pytest.mark.parametrize("case", sorted(KNOWN_OVERRIDE_CRASHES))
def test_former_override_crash(case: str, monkeypatch, capsys) -> None:
    try:
        rc, _, err = _run_cli(["parts/tiny.yaml", *KNOWN_OVERRIDE_CRASHES[case]], monkeypatch, capsys)
    except Exception as e:  # the point: nothing escapes
        pytest.fail(f"{type(e).__name__} escaped: {e}"[:300])
    # Both end up as valid specs (a huge d_model; a key added then deleted): no crash is the point.
    assert rc == 0 or (rc == 1 and "Traceback" not in err)


def test_alias_bomb_is_rejected_quickly(tmp_path: Path) -> None:
    """10**9 nodes from 9 short lines: must be refused, not expanded (subprocess + timeout)."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(_alias_bomb(), encoding="utf-8")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "moespec", "validate", spec.name],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=5,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("validate did not finish within 5 s")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
