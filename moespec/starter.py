"""``moespec init``: a commented starter spec with the yaml-language-server modeline.

The modeline points at the installed schema by absolute ``file://`` URI, not by a path
relative to the new file: the spec keeps its editor support when it is moved or copied
elsewhere (a relative path broke on the first move). ``--schema`` writes any path or URL
instead (e.g. a schema committed beside the project's specs).
"""

from __future__ import annotations

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
    """The starter spec for ``out``; the modeline points at ``schema`` or, by absolute URI,
    the installed schema."""
    if schema is None:
        schema = schema_path().resolve().as_uri()
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name).lstrip("_.-") or "moe"
    return STARTER.format(schema=schema, file=out.name, name=safe)
