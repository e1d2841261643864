"""One row of ``metrics.jsonl``: the step's losses and the MoE blocks' routing statistics.

- ``loss``: the cross-entropy (next-byte, nats); ``aux_loss``: the MoE blocks' weighted
  auxiliary losses summed (what training adds to ``loss``);
- ``expert_load``: per MoE block, each expert's share of the routed (token, expert) pairs
  before capacity (``routed_per_expert`` normalised to sum 1);
- ``dropped_fraction`` and ``router_entropy``: the mean over MoE blocks of the layers'
  statistics of the same names (see :class:`moespec.runtime.layer.MoELayer`);
- ``lr`` and ``tokens_per_s`` (training throughput since the previous logged row).
"""

from __future__ import annotations

from typing import Any

from moespec.runtime.network import MoENetwork, NetworkOutput


def step_metrics(
    model: MoENetwork, res: NetworkOutput, step: int, lr: float, tokens_per_s: float
) -> dict[str, Any]:
    """The metrics row of the step that just ran (``step`` steps done)."""
    loads, dropped, entropy = [], [], []
    for layer in model.moe_layers:
        stats = layer.routing_stats
        routed = stats["routed_per_expert"].detach().float()
        loads.append([round(float(v), 5) for v in (routed / routed.sum().clamp_min(1e-9)).tolist()])
        dropped.append(float(stats["dropped_fraction"]))
        entropy.append(float(stats["router_entropy"]))
    n = max(len(loads), 1)
    return {
        "step": step,
        "loss": float(res.ce_loss.detach()),
        "aux_loss": float(res.aux_loss.detach()),
        "lr": lr,
        "tokens_per_s": round(tokens_per_s, 1),
        "dropped_fraction": sum(dropped) / n,
        "router_entropy": sum(entropy) / n,
        "expert_load": loads,
    }
