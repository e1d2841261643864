"""The package's layers only look down (docs/architecture.md, "Who may import whom").

Every ``moespec`` import in the package's source, module level or inside a function, is
checked against the allowed directions; ``spec/`` and ``ir/`` must also load without torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moespec"

# Layer of a module by its dotted name: the first matching prefix wins.
LAYERS = (
    ("moespec.reference", "reference"),
    ("moespec.spec", "spec"),
    ("moespec.ir", "ir"),
    ("moespec.common", "common"),
    ("moespec.codegen", "codegen"),
    ("moespec.ops", "ops"),
    ("moespec.lower", "lower"),
    ("moespec.runtime", "runtime"),
    ("moespec.export", "export"),
    ("moespec.parallel", "parallel"),
    ("moespec.train", "train"),
    ("moespec.hf", "hf"),
    ("moespec.errors", "base"),
    ("moespec.resources", "base"),
    ("moespec.outputs", "base"),
)
BELOW = {
    "base": set(),
    "spec": {"base"},
    "ir": {"spec", "base"},
    "common": {"ir", "spec", "base"},
    "reference": {"common", "spec", "base"},
    "codegen": {"base"},
    "ops": {"codegen", "common", "ir", "spec", "base"},
    "lower": {"ops", "codegen", "common", "ir", "spec", "base"},
    "runtime": {"lower", "ops", "codegen", "common", "ir", "spec", "base"},
    "export": {"runtime", "lower", "ops", "codegen", "common", "ir", "spec", "base"},
    "parallel": {"runtime", "lower", "ops", "codegen", "common", "ir", "spec", "base"},
    "train": {"runtime", "lower", "ops", "codegen", "common", "ir", "spec", "base"},
    "hf": {"export", "runtime", "lower", "ops", "codegen", "common", "ir", "spec", "base"},
}


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to; ``top`` for the API, CLI and the rest."""
    if module == "moespec":
        return "base"  # the package root: __version__ and the spec models (no torch)
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "top"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every moespec import in ``path`` (``from a import b`` counts as
    ``a.b`` when ``a.b`` is a module, so importing a subpackage counts as that subpackage)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("moespec")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moespec"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    PKG.parent / Path(*sub.split("."))
                ).is_dir()
                out.append((node.lineno, sub if is_module else node.module))
    return out


def test_layers_only_import_downwards() -> None:
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        src = module_name(path)
        mine = layer_of(src)
        if mine == "top" or src == "moespec":  # the package root is the public API (top)
            continue
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs != mine and theirs not in BELOW[mine]:
                wrong.append(f"{path.relative_to(PKG.parent)}:{line}: {mine} imports {target} ({theirs})")
    assert not wrong, "imports against the allowed directions:\n" + "\n".join(wrong)


def test_nothing_below_imports_the_api_or_cli() -> None:
    for path in sorted(PKG.rglob("*.py")):
        if layer_of(module_name(path)) == "top" or module_name(path) == "moespec":
            continue
        for line, target in imports(path):
            assert layer_of(target) != "top", f"{path}:{line} imports {target}"


def modules_loaded_by(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with ``prefixes`` that ``import <imports>`` loads, in a fresh
    interpreter."""
    listing = f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    code = f"import sys\nimport {imports}\n{listing}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ast.literal_eval(r.stdout.strip())


def test_spec_and_ir_load_without_torch() -> None:
    light = "moespec.spec.load, moespec.spec.validate, moespec.spec.jsonschema, moespec.ir.build, "
    light += "moespec.ir.summary, moespec.ir.printer"
    assert modules_loaded_by(light, ("torch",)) == [], "spec/ or ir/ imported torch"


def test_layer_of() -> None:
    assert layer_of("moespec.reference.routers.topk") == "reference"
    assert layer_of("moespec.ops.expert_ffn") == "ops"
    assert layer_of("moespec.api") == "top"
    assert layer_of("moespec.errors") == "base"


def test_the_reference_is_a_leaf() -> None:
    # Importing the oracle must not register (or even import) the fast path it checks.
    fast = ("moespec.ops", "moespec.lower", "moespec.runtime")
    assert modules_loaded_by("moespec.reference, moespec.reference.layer", fast) == []
