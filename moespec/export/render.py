"""Render the standalone ``module.py`` of an artifact from ``templates/module/module.py.jinja``.

The jinja2 environment (strict, ``moespec.codegen.templates``) is shared with the Triton kernels.
"""

from __future__ import annotations

from typing import Any

from moespec.codegen.templates import environment
from moespec.runtime.layout import LOCK, MODULE_TEMPLATE, WEIGHTS


def render_module(*, version: str, spec_name: str, spec_sha256: str, layer: str, d_model: int,
                  dtype: str, graphs: dict[str, str], custom_ops: list[str]) -> str:  # fmt: skip
    """The text of ``module.py`` for one built layer."""
    context: dict[str, Any] = {
        "version": version,
        "template": f"templates/{MODULE_TEMPLATE}",
        "spec_name": spec_name,
        "spec_sha256": spec_sha256,
        "layer": layer,
        "d_model": d_model,
        "dtype": dtype,
        "lock_file": LOCK,
        "weights_file": WEIGHTS,
        "graphs": graphs,
        "custom_ops": custom_ops,
    }
    return environment().get_template(MODULE_TEMPLATE).render(**context)
