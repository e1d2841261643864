"""The artifact report: derived numbers, weights, IR text and the FX graphs of a built layer.

``report_data`` gathers everything as plain JSON-able data (``report.json``);
``report_text`` renders it for people (``report.txt``) and ``summary_text`` is the short
numbers block ``moespec build`` prints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from moespec.ir.build import build_program
from moespec.ir.model_numbers import ModelNumbers
from moespec.ir.printer import print_layer, print_program
from moespec.ir.summary import explain_data, human, model_lines
from moespec.ops import registered_op_set
from moespec.runtime.layer import MoELayer
from moespec.spec.load import LoadedSpec

DTYPE_NAMES = {v: str(v).removeprefix("torch.") for v in (torch.float32, torch.float16, torch.bfloat16)}
NUMBERS_TITLE = "derived numbers (one MoE layer; FLOPs = forward matmul FLOPs, 2 per MAC)"


def used_op_set(custom_ops: list[str]) -> list[str]:
    """The ``moespec::`` ops an artifact needs: those its graphs call (``report["custom_ops"]``)
    and their registered backward ops."""
    registered = set(registered_op_set())
    names = {"moespec::" + o.removeprefix("torch.ops.moespec.") for o in custom_ops}
    return sorted(names | {n + "_backward" for n in names if n + "_backward" in registered})


def target_name(node: fx.Node) -> str:
    """A readable, importable-looking name for what an FX node calls."""
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return f"self.{t}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return "torch.ops." + t._qualified_op_name.replace("::", ".")
    if isinstance(t, torch._ops.OpOverload):
        return "torch.ops." + t.name().replace("::", ".")
    module = getattr(t, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    qual = getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
    return f"{module}.{qual}" if module else qual


def graph_code(module: MoELayer) -> dict[str, str]:
    """``{"train": code, "eval": code}``: the readable Python of both GraphModules."""
    was_training, out = module.training, {}
    try:
        for mode in ("train", "eval"):
            module.train(mode == "train")
            lines = [line.rstrip() for line in module.graph_module.code.strip("\n").splitlines()]
            out[mode] = "\n".join(lines) + "\n"
    finally:
        module.train(was_training)
    return out


def graph_ops(module: MoELayer) -> list[str]:
    """Distinct call targets of the train and eval graphs, in order of first use."""
    was_training, seen = module.training, {}
    try:
        for mode in (True, False):
            module.train(mode)
            for node in module.graph_module.graph.nodes:
                if node.op in ("call_function", "call_method", "call_module"):
                    seen.setdefault(target_name(node), None)
    finally:
        module.train(was_training)
    return list(seen)


def ir_text(loaded: LoadedSpec, module: MoELayer) -> str:
    """The IR of the built layer: the program header line, then the layer's lines."""
    head = print_program(build_program(loaded.spec)).splitlines()[0]
    return "\n".join([head, *print_layer(module.ir)]) + "\n"


def report_data(loaded: LoadedSpec, module: MoELayer, spec_sha256: str, versions: dict[str, str]) -> dict:
    """Everything ``report.json`` holds (see the module docstring of ``moespec.runtime.layout``)."""
    explained = explain_data(loaded)
    ops = graph_ops(module)
    return {
        "spec_name": loaded.spec.name,
        "spec_sha256": spec_sha256,
        "layer": module.ir.name,
        "versions": versions,
        "numbers": module.ir.numbers.to_json(),
        "spec_layers": explained["layers"],
        "spec_totals": explained["totals"],
        "spec_model": explained["model"],
        "state_dict": {
            k: {"shape": list(v.shape), "dtype": DTYPE_NAMES.get(v.dtype, str(v.dtype))}
            for k, v in module.state_dict().items()
        },
        "ops": ops,
        "custom_ops": [o for o in ops if o.startswith("torch.ops.moespec.")],
        "ir": ir_text(loaded, module),
        "graph": graph_code(module),
        "provenance": explained["provenance"],
    }


def summary_text(report: dict[str, Any]) -> str:
    """Header and derived-numbers block (what ``moespec build`` prints)."""
    n = report["numbers"]
    v = report["versions"]
    rows = [
        ("group", f"{n['name']} (x{n['count']} in the spec)"),
        ("experts", f"{n['n_experts']} ({n['n_ffn_experts']} FFN), {n['experts_per_token']:g} per token"),
        ("params total", f"{n['params_total']:,} ({human(n['params_total'])})"),
        ("params active", f"{n['params_active']:,} ({human(n['params_active'])})"),
        (
            "  router/routed/shared",
            " / ".join(f"{n[k]:,}" for k in ("params_router", "params_routed", "params_shared")),
        ),
        ("flops per token", f"{n['flops_per_token']:,} ({human(n['flops_per_token'])})"),
        ("weights per rank", f"{n['weight_bytes_per_rank']:,} B ({human(n['weight_bytes_per_rank'], 'B')})"),
    ]
    head = [
        f"spec     {report['spec_name']}  sha256 {report['spec_sha256']}",
        f"layer    {report['layer']}",
        f"built by moespec {v['moespec']}, torch {v['torch']}",
        "",
        NUMBERS_TITLE,
    ]
    width = max(len(k) for k, _ in rows)
    network = report.get("spec_model")
    tail = ["", *model_lines(ModelNumbers(**network))] if network else []
    return "\n".join(head + [f"  {k:<{width}}  {val}" for k, val in rows] + tail) + "\n"


def report_head(report: dict[str, Any], summary: str) -> list[str]:
    """The parts every ``report.txt`` starts with: title, ``summary``, the weights, the custom
    ops and the IR."""
    sd = report["state_dict"]
    kw = max((len(k) for k in sd), default=0)
    weights = [f"  {k:<{kw}}  {v['shape']!s:<18} {v['dtype']}" for k, v in sd.items()]
    return [
        "moespec artifact report",
        "",
        summary,
        "weights (model.safetensors, moespec-native layout)",
        *weights,
        "",
        "custom ops used: " + ", ".join(report["custom_ops"]),
        "",
        "IR (moespec explain --ir)",
        report["ir"],
    ]


def report_text(report: dict[str, Any]) -> str:
    """The full human-readable report (``report.txt``)."""
    parts = [
        *report_head(report, summary_text(report)),
        "FX graph, training mode (MoELayer.graph_module.code)",
        report["graph"]["train"],
        "FX graph, eval mode",
        report["graph"]["eval"],
    ]
    return "\n".join(parts).rstrip("\n") + "\n"
