"""The artifact directory's contract: file names, format version and the error type.

An artifact directory holds::

    manifest.json       versions, op set (the moespec ops it needs), spec sha256, layer, seed,
                        files (bytes + sha256)
    spec.lock.yaml      the fully resolved spec (extends and overrides applied, defaults written)
    model.safetensors   the layer's state_dict ("moespec-native" layout) with metadata
    module.py           standalone loader generated from templates/module/module.py.jinja
    report.json         derived numbers, state_dict keys/shapes, IR text, ops used in the graphs
    report.txt          the same for humans
    ir.txt, graph.txt   the IR and the FX graph code, for review and diffs
    kernels/*.py        (target.backend: triton) the generated Triton kernels, one per file

A network artifact (a spec with a `model:` section built without a layer name) is the same
directory with ``layer`` = :data:`NETWORK`, the network's state_dict and its module.py from
``templates/module/network.py.jinja`` (kernels/: the union of its MoE designs' kernels).

This module imports nothing heavy, so readers (``moespec.load``) and writers share it cheaply;
reading and checking a manifest is ``moespec.runtime.manifest``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moespec.errors import ArtifactError

__all__ = ["ArtifactError"]  # re-exported: readers and writers raise it

FORMAT = "moespec-artifact"
FORMAT_VERSION = 1
LAYOUT = "moespec-native"  # state_dict key layout of model.safetensors
MODULE_TEMPLATE = "module/module.py.jinja"
NETWORK_TEMPLATE = "module/network.py.jinja"
# The manifest's (and the weights' metadata) `layer` of a network artifact: not an identifier,
# so no layer group can bear it.
NETWORK = "<model>"

MANIFEST = "manifest.json"
LOCK = "spec.lock.yaml"
WEIGHTS = "model.safetensors"
MODULE = "module.py"
REPORT_JSON = "report.json"
REPORT_TXT = "report.txt"
IR_TXT = "ir.txt"
GRAPH_TXT = "graph.txt"
KERNELS = "kernels"
REQUIRED = (MANIFEST, LOCK, WEIGHTS)  # what ``moespec.load`` needs; the rest is for people


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (weights can be large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_artifact_dir(path: Path) -> bool:
    """True if ``path`` is a directory holding a moespec manifest (safe to replace with --force)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT
