"""Tests of the generated Triton kernels under Triton's CPU interpreter.

The interpreter must be switched on before triton is imported, so these tests run only in a
process started with ``TRITON_INTERPRET=1``: ``tests/test_triton_interpreter.py`` starts one
(pytest on this folder); a plain ``pytest`` run skips the folder.
"""

from __future__ import annotations

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_ignore_collect(collection_path, config):
    return None if INTERPRETING else True
