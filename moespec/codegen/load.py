"""Load rendered Triton kernels as Python modules.

Triton compiles a kernel from its Python source, so the rendered text must live in a real
file: it is written once into a cache directory named by the sources' hash
(``$MOESPEC_CACHE_DIR`` or ``~/.cache/moespec``; written to a temporary name and renamed, so
concurrent processes never import a half-written file) and imported from there. Whether the
kernels can run here is checked before anything is rendered (:func:`require_triton`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

from moespec.codegen.render import RouterSpecialisation, Specialisation, render_all, source_digest
from moespec.errors import TargetError


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``, set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require_triton(device_type: str) -> None:
    """Raise a :class:`TargetError` on ``target.backend`` unless Triton kernels can run on
    ``device_type`` here: CUDA with Triton installed, or the CPU under ``TRITON_INTERPRET=1``."""
    if device_type not in ("cuda", "cpu"):
        raise TargetError("target.backend", f"triton, but its kernels do not run on {device_type} tensors")
    if device_type == "cpu" and not interpreting():
        raise TargetError(
            "target.backend",
            "triton, but the tensors are on the CPU: Triton kernels run on CUDA, or on the CPU only "
            "under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported); use a "
            "CUDA device or backend: torch",
        )
    if not _triton_installed():
        raise TargetError(
            "target.backend", "triton, but the triton package is not installed (pip install triton)"
        )


@functools.cache
def _triton_installed() -> bool:
    # Asked on every kernel call: the import system's search is cached for the process (a
    # package installed while it runs is seen by the next process).
    return importlib.util.find_spec("triton") is not None


def cache_root() -> Path:
    """moespec's cache directory: ``$MOESPEC_CACHE_DIR`` or ``~/.cache/moespec``."""
    return Path(os.environ.get("MOESPEC_CACHE_DIR") or Path.home() / ".cache" / "moespec")


def cache_dir() -> Path:
    """Where rendered kernels are written for import."""
    return cache_root() / "triton"


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    if path.exists() and path.read_text() == text:
        return path
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _import(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def kernel_set(spec: Specialisation | RouterSpecialisation) -> SimpleNamespace:
    """The jitted kernels of ``spec``, one attribute per kernel name (``spec.kernels``), plus
    ``sources`` (file name -> rendered text) and ``directory`` (where they were imported from)."""
    sources = render_all(spec)
    directory = cache_dir() / f"{spec.key}-{source_digest(sources)}"
    directory.mkdir(parents=True, exist_ok=True)
    kernels = {}
    for file_name, text in sources.items():
        path = _write(directory, file_name, text)
        name = file_name.split("__")[0]
        module = _import(path, f"moespec_triton_{spec.key.replace('-', '_')}_{name}")
        kernels[name] = getattr(module, name)
    assert set(kernels) == set(spec.kernels)
    return SimpleNamespace(**kernels, sources=sources, directory=directory)
