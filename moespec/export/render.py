"""Render the standalone ``module.py`` of an artifact from ``templates/module/module.py.jinja``.

The jinja2 environment is strict (``StrictUndefined``: a missing variable is an error, never
an empty string) and keeps trailing newlines, so the rendered file is exactly the template.
"""

from __future__ import annotations

import json
from typing import Any

import jinja2

from moespec.resources import data_dir
from moespec.runtime.layout import LOCK, MODULE_TEMPLATE, WEIGHTS


def environment() -> jinja2.Environment:
    """The jinja2 environment for moespec's templates."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    # Python literals of names and hashes: JSON strings/lists are valid Python, double-quoted.
    env.filters["pylit"] = lambda value: json.dumps(value)
    env.filters["comment"] = lambda text: "\n".join(("# " + ln).rstrip() for ln in text.splitlines())
    return env


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
