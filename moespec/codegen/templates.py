"""The jinja2 environment of moespec's templates (``templates/``: Triton kernels and the
artifact's ``module.py``).

Strict (``StrictUndefined``: a missing variable is an error, never an empty string) and
keeping trailing newlines, so a rendered file is exactly its template.
"""

from __future__ import annotations

import functools
import json

import jinja2

from moespec.resources import data_dir


@functools.lru_cache(maxsize=1)
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
