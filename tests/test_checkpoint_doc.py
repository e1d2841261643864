"""docs/checkpoint.md lists exactly the state_dict keys built layers have.

Every example spec in specs/ (each layer group) and every router kind (with the options that
add tensors) is built at a tiny size; each state_dict key is matched against the doc's tables:
the layer table (experts, shared, zero-compute, multi-head, schedule keys) or the table of
the layer's router kind. The doc's shapes are evaluated with the layer's sizes and compared
with the tensors' shapes, and its "tensor" column (parameter / buffer) and dtype column
(int64 or floating) with the module's. A key the doc lists that no build produced, or a key
a build produced that the doc does not list, fails with the key named.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import moespec
from moespec.spec.routers import ROUTERS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "checkpoint.md"
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
D_MODEL = 48  # divisible by every multi_head.heads the specs use

TINY = {
    "moespec": 1,
    "name": "ckpt",
    "d_model": 24,
    "layer": {
        "experts": {"routed": [{"count": 4, "kind": "mlp", "activation": "relu", "d_ff": 8}]},
        "router": {"kind": "topk", "k": 2},
    },
}
CUSTOM = "moespec.examples.custom_router:softmax_topk"

# (router, extra layer settings) for every router kind, with each option that adds a tensor.
VARIANTS: list[tuple[dict, dict]] = [
    ({"kind": "topk", "k": 2}, {}),
    ({"kind": "topk", "k": 2, "bias": True, "noise": {"kind": "learned"}, "expert_bias": {}}, {}),
    ({"kind": "topk", "k": 2, "bias": True, "trainable": False, "gating_residual": True}, {}),
    ({"kind": "topk", "k": 2, "gating_residual": True}, {}),
    ({"kind": "expert_choice", "bias": True}, {}),
    ({"kind": "relu", "k": 2}, {}),
    ({"kind": "top_p"}, {}),
    ({"kind": "adaptive_gating"}, {}),
    ({"kind": "soft_moe", "group_size": 8}, {}),
    ({"kind": "soft_moe", "group_size": 8, "normalize": False, "slots_per_expert": 2}, {}),
    ({"kind": "base"}, {}),
    ({"kind": "sinkhorn"}, {}),
    ({"kind": "hash", "vocab_size": 11, "k": 2}, {}),
    ({"kind": "cosine", "k": 2, "learnable_temperature": True, "proj_dim": 6}, {}),
    ({"kind": "dselect_k", "k": 2}, {}),
    ({"kind": "custom", "function": CUSTOM, "output": "topk", "k": 2, "options": {"k": 2}}, {}),
    (
        {"kind": "topk", "k": 2},
        {
            "experts": {
                "routed": [
                    {
                        "count": 2,
                        "kind": "glu",
                        "activation": "silu",
                        "d_ff": 12,
                        "bias": True,
                        "granularity": 2,
                    },
                    {"count": 3, "kind": "mlp", "activation": "gelu", "d_ff": 10, "bias": True},
                ],
                "shared": {
                    "kind": "glu",
                    "activation": "silu",
                    "d_ff": 6,
                    "count": 2,
                    "bias": True,
                    "gate": True,
                },
                "zero_compute": [{"kind": "zero"}, {"kind": "constant", "count": 2}],
            },
            "multi_head": {"heads": 2, "bias": True},
            "schedules": [{"param": "router.k", "kind": "linear", "start": 1, "end": 2, "steps": 10}],
        },
    ),
    ({"kind": "topk", "k": 1}, {"multi_head": {"heads": 3, "bias": False}}),
]


@dataclass
class Row:
    key: str
    shape: str
    tensor: str
    dtype: str
    seen: bool = False


@dataclass
class Doc:
    layer: dict[str, Row] = field(default_factory=dict)
    routers: dict[str, dict[str, Row]] = field(default_factory=dict)


def parse_doc() -> Doc:
    """The doc's key tables: `## Layer keys`, then one `### \\`kind\\`` section per router kind
    under `## Router keys`. Rows: | `key` | `[shape]` | tensor | dtype | when | meaning |."""
    doc, table, section = Doc(), None, None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            table = doc.layer if section == "Layer keys" else None
        elif line.startswith("### ") and section == "Router keys":
            kind = re.fullmatch(r"### `(\w+)`", line.strip())
            assert kind, f"router section heading {line!r} is not ### `kind`"
            table = doc.routers.setdefault(kind[1], {})
        elif table is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key, shape, tensor, dtype = (c.strip("`") for c in cells[:4])
            assert key not in table, f"{key} listed twice"
            table[key] = Row(key, shape, tensor, dtype)
    return doc


def key_pattern(key: str) -> re.Pattern:
    """`experts.{g}.w_up` matches `experts.0.w_up`, with the index in group `g`."""
    return re.compile(re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(key)) + "$")


def symbols(layer, d_model: int, g: int | None, z: int | None) -> dict[str, int]:
    """The doc's shape symbols for one layer spec (and a key's group / zero-compute index)."""
    ex, r = layer.experts, layer.router
    heads = layer.multi_head.heads if layer.multi_head else 1
    e = ex.n_routed
    out = {"d_model": d_model, "D": d_model // heads, "E": e, "m": max(1, math.ceil(math.log2(e)))}
    for name in ("k", "p", "P", "V"):
        attr = {"p": "slots_per_expert", "P": "proj_dim", "V": "vocab_size"}.get(name, name)
        if isinstance(getattr(r, attr, None), int):
            out[name] = getattr(r, attr)
    if g is not None:
        out |= {"E_g": ex.routed[g].n_experts, "F_g": ex.routed[g].width}
    if ex.shared is not None:
        out |= {"S": ex.shared.count, "F_s": ex.shared.d_ff}
    if z is not None:
        out["n_z"] = ex.zero_compute[z].count
    return out


def eval_shape(shape: str, sym: dict[str, int]) -> tuple[int, ...]:
    """`[k·m, D]` -> (k*m, D) with the layer's sizes; `[]` -> ()."""
    inner = shape.strip()[1:-1].strip()
    dims = []
    for dim in filter(None, (d.strip() for d in inner.split(","))):
        value = 1
        for factor in dim.split("·"):
            value *= int(factor) if factor.isdigit() else sym[factor]
        dims.append(value)
    return tuple(dims)


def tiny_spec_dict(path: Path) -> dict:
    """A spec of specs/ with d_model and every d_ff shrunk (granularity still divides d_ff)."""
    data = moespec.load_spec(path).spec.model_dump(mode="json")
    data.pop("model", None)  # the layer alone: a shrunk d_model may not fit the network's heads

    def shrink(node):
        if isinstance(node, dict):
            if "d_ff" in node:
                node["d_ff"] = 4 * node.get("granularity", 1)
            for v in node.values():
                shrink(v)
        elif isinstance(node, list):
            for v in node:
                shrink(v)

    shrink(data)
    data.pop("extends", None)  # already merged
    data["d_model"] = D_MODEL
    return data


def builds():
    """(label, spec dict, layer group name or None) of every layer the test builds."""
    out = []
    for path in SPECS:
        data = tiny_spec_dict(path)
        names = [n for n, _, _ in moespec.load_spec(data).spec.layer_groups()]
        for name in names:
            out.append((f"{path.name}:{name}", data, name if len(names) > 1 else None))
    for i, (router, settings) in enumerate(VARIANTS):
        data = {**TINY, "layer": {**TINY["layer"], "router": router, **settings}}
        out.append((f"variant {i} ({router['kind']})", data, None))
    return out


def observed():
    """Every (label, router kind, key, shape, is_buffer, is_int64, symbols) of the builds."""
    rows = []
    for label, data, group in builds():
        loaded = moespec.load_spec(data)
        layer_spec = loaded.spec.layer_named(group)
        module = moespec.build(data, seed=0, layer=group)
        buffers = {name for name, _ in module.named_buffers()}
        for key, t in module.state_dict().items():
            shape = tuple(t.shape)
            rows.append((label, layer_spec, loaded.spec.d_model, key, shape, key in buffers, t.dtype))
    return rows


@pytest.fixture(scope="module")
def doc_and_rows():
    return parse_doc(), observed()


def _match(table: dict[str, Row], key: str):
    for row in table.values():
        m = key_pattern(row.key).match(key)
        if m:
            return row, m.groupdict()
    return None, {}


def test_every_router_kind_is_documented_and_built(doc_and_rows):
    doc, rows = doc_and_rows
    built = {layer.router.kind for _, layer, *_ in rows}
    assert built == set(ROUTERS.kinds), f"router kinds not built: {sorted(set(ROUTERS.kinds) - built)}"
    assert set(doc.routers) == set(ROUTERS.kinds), (
        f"docs/checkpoint.md router sections: missing {sorted(set(ROUTERS.kinds) - set(doc.routers))}, "
        f"extra {sorted(set(doc.routers) - set(ROUTERS.kinds))}"
    )


def test_doc_lists_exactly_the_built_keys(doc_and_rows):
    doc, rows = doc_and_rows
    problems, used = [], set()
    for label, layer, d_model, key, shape, is_buffer, dtype in rows:
        kind = layer.router.kind
        table = doc.routers.get(kind, {}) if key.startswith("router.") else doc.layer
        row, idx = _match(table, key)
        where = f"router kind {kind!r}" if key.startswith("router.") else "the layer keys"
        if row is None:
            problems.append(f"{label}: {key} {list(shape)} is missing from {where} in docs/checkpoint.md")
            continue
        used.add((kind if key.startswith("router.") else "", row.key))
        sym = symbols(layer, d_model, *(int(idx[c]) if c in idx else None for c in "gz"))
        try:
            expected = eval_shape(row.shape, sym)
        except KeyError as e:
            problems.append(f"{label}: {key}: shape {row.shape} uses {e} which this layer does not define")
            continue
        if expected != shape:
            problems.append(f"{label}: {key} is {list(shape)}; the doc says {row.shape} = {list(expected)}")
        tensor = "buffer" if is_buffer else "parameter"
        if tensor not in row.tensor:
            problems.append(f"{label}: {key} is a {tensor}, the doc says {row.tensor!r}")
        if (dtype == torch.int64) != (row.dtype == "int64"):
            problems.append(f"{label}: {key} has dtype {dtype}, the doc says {row.dtype!r}")
    for kind, table in [("", doc.layer), *doc.routers.items()]:
        for key in table:
            if (kind, key) not in used:
                where = f"router kind {kind!r}" if kind else "the layer keys"
                problems.append(f"docs/checkpoint.md lists {key} under {where}, but no built layer has it")
    assert not problems, "\n".join(problems)
