"""The artifact of a whole network (a spec with a `model:` section built without ``layer``):
the same directory as a layer's (manifest, lock, weights, module.py, report, IR and graphs),
with the manifest's ``layer`` set to :data:`~moespec.runtime.layout.NETWORK`, the network's
state_dict in ``model.safetensors``, the whole model's numbers in the report and the op
graphs of each MoE layer design it uses."""

from __future__ import annotations

from typing import Any

from moespec.codegen.templates import environment
from moespec.export.report import DTYPE_NAMES, graph_code, graph_ops, report_head
from moespec.ir.build import build_program
from moespec.ir.model_numbers import ModelNumbers
from moespec.ir.printer import print_program
from moespec.ir.summary import explain_data, model_lines
from moespec.runtime.layer import MoELayer
from moespec.runtime.layout import LOCK, NETWORK, NETWORK_TEMPLATE, WEIGHTS
from moespec.runtime.network import MoENetwork
from moespec.spec.load import LoadedSpec


def _designs(net: MoENetwork) -> dict[str, MoELayer]:
    """One built layer per MoE layer design the network uses, in first-use order."""
    out: dict[str, MoELayer] = {}
    for layer in net.moe_layers:
        out.setdefault(layer.ir.name, layer)
    return out


def network_report_data(
    loaded: LoadedSpec, net: MoENetwork, spec_sha256: str, versions: dict[str, str]
) -> dict:
    """What ``report.json`` holds for a network: the layer report's fields, with ``numbers``
    the whole model's and ``graph`` keyed ``"<design> <mode>"``."""
    explained = explain_data(loaded)
    designs = _designs(net)
    ops: dict[str, None] = {}
    graphs: dict[str, str] = {}
    for name, layer in designs.items():
        ops.update(dict.fromkeys(graph_ops(layer)))
        graphs.update({f"{name} {mode}": code for mode, code in graph_code(layer).items()})
    return {
        "spec_name": loaded.spec.name,
        "spec_sha256": spec_sha256,
        "layer": NETWORK,
        "versions": versions,
        "numbers": explained["model"],
        "spec_layers": explained["layers"],
        "spec_totals": explained["totals"],
        "spec_model": explained["model"],
        "state_dict": {
            k: {"shape": list(v.shape), "dtype": DTYPE_NAMES.get(v.dtype, str(v.dtype))}
            for k, v in net.state_dict().items()
        },
        "ops": list(ops),
        "custom_ops": [o for o in ops if o.startswith("torch.ops.moespec.")],
        "ir": print_program(build_program(loaded.spec)),
        "graph": graphs,
        "provenance": explained["provenance"],
    }


def network_summary_text(report: dict[str, Any]) -> str:
    """Header and whole-model numbers (what ``moespec build`` prints for a network)."""
    v = report["versions"]
    head = [
        f"spec     {report['spec_name']}  sha256 {report['spec_sha256']}",
        f"network  {report['numbers']['kind']}",
        f"built by moespec {v['moespec']}, torch {v['torch']}",
        "",
    ]
    return "\n".join(head + model_lines(ModelNumbers(**report["numbers"]))) + "\n"


def network_report_text(report: dict[str, Any]) -> str:
    """The full human-readable report of a network artifact (``report.txt``)."""
    parts = report_head(report, network_summary_text(report))
    for key, code in report["graph"].items():
        parts += [f"FX graph of MoE layer design {key} mode", code]
    return "\n".join(parts).rstrip("\n") + "\n"


def render_network_module(*, version: str, spec_name: str, spec_sha256: str, kind: str, vocab_size: int,
                          graphs: dict[str, str], custom_ops: list[str]) -> str:  # fmt: skip
    """The text of ``module.py`` for a network artifact."""
    context: dict[str, Any] = {
        "version": version,
        "template": f"templates/{NETWORK_TEMPLATE}",
        "spec_name": spec_name,
        "spec_sha256": spec_sha256,
        "layer": NETWORK,
        "kind": kind,
        "vocab_size": vocab_size,
        "lock_file": LOCK,
        "weights_file": WEIGHTS,
        "graphs": graphs,
        "custom_ops": custom_ops,
    }
    return environment().get_template(NETWORK_TEMPLATE).render(**context)
