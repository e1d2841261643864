"""``moespec init``: a commented starter spec with the yaml-language-server modeline."""

from __future__ import annotations

import os
from pathlib import Path

from moespec.resources import schema_path

STARTER = """\
# yaml-language-server: $schema={schema}
# A moespec v1 spec: one MoE layer design. `moespec validate {file}` checks it,
# `moespec explain {file}` shows the resolved spec and its parameter/FLOP counts.
moespec: 1
name: {name}
d_model: 512
layer:
  experts:
    routed:
      - count: 8          # number of experts
        kind: glu         # glu (gated, 3 matrices) or mlp (2 matrices)
        activation: silu  # silu, gelu, gelu_tanh, relu
        d_ff: 1024        # hidden width of each expert
  router:
    kind: topk
    k: 2                  # experts per token
    score: softmax
    renormalize: true
  capacity:
    kind: dropless
  losses:
    load_balance: {{kind: switch, weight: 0.01}}
    z_loss: {{weight: 0.001}}
target:
  backend: torch
  device: cpu
  dtype: fp32
"""


def starter_text(out: Path, *, schema: str | None, name: str) -> str:
    """The starter spec for ``out``; the modeline points at ``schema`` or the installed schema."""
    if schema is None:
        schema = os.path.relpath(schema_path(), out.resolve().parent)
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name).lstrip("_.-") or "moe"
    return STARTER.format(schema=schema, file=out.name, name=safe)
