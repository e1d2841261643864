"""Every example spec (each layer group), built tiny in fp32 on the CPU and on the device with
the same weights, run forward + backward on the same input: output, aux loss, router logits,
x's and every parameter's gradient, the state after the call (expert bias, ReMoE's λ) and
the routing statistics agree (relative to the norm, 1e-4), and nothing comes back on another
device. Odd token counts (1, 7, 64) for several router kinds and the heterogeneous specs."""

from __future__ import annotations

from pathlib import Path

import pytest

import moespec

SPECS = Path(__file__).resolve().parents[2] / "specs"
SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))
GROUPS = {"debug-groups.yaml": ["early", "late"]}  # specs with several layer groups

# (training, weights moved away from their init)
MODES = [pytest.param(True, True, id="train-moved"), pytest.param(False, False, id="eval-init")]


def test_every_spec_is_covered(tiny_spec):
    """GROUPS names every multi-group spec (a new one must be added there to be covered)."""
    for name in SPEC_FILES:
        names = [n for n, _, _ in moespec.load_spec(tiny_spec(name)).spec.layer_groups()]
        assert names == GROUPS[name] if len(names) > 1 else name not in GROUPS, name


CASES = [(name, group) for name in SPEC_FILES for group in GROUPS.get(name, [None])]


@pytest.mark.parametrize("training,moved", MODES)
@pytest.mark.parametrize("name,group", CASES, ids=[f"{n}:{g}" if g else n for n, g in CASES])
def test_spec_layer_matches_cpu(name, group, training, moved, tiny_spec, cpu_vs_device):
    cpu_vs_device(tiny_spec(name), layer=group, training=training, moved=moved)


# Token-choice top-k, expert choice, top-p, Soft MoE, ReLU, Sinkhorn, BASE; heterogeneous
# widths (hmoe), several expert groups with shared and zero-compute experts (debug-hetero,
# moe-plus-plus).
ODD = [
    "mixtral-8x7b.yaml",
    "expert-choice.yaml",
    "top-p-dynamic.yaml",
    "soft-moe.yaml",
    "remoe.yaml",
    "sinkhorn.yaml",
    "base-layers.yaml",
    "hmoe.yaml",
    "debug-hetero.yaml",
    "moe-plus-plus.yaml",
]


@pytest.mark.parametrize("t", [1, 7, 64])
@pytest.mark.parametrize("name", ODD)
def test_odd_token_counts(name, t, tiny_spec, cpu_vs_device):
    cpu_vs_device(tiny_spec(name), lead=(t,), training=True, moved=True)


@pytest.mark.parametrize("d_model", [40, 100])
def test_hetero_odd_widths(d_model, tiny_spec, cpu_vs_device):
    """d_model 40 / 100: rows of 160 / 400 bytes, grouped_mm's alignment holds for neither
    every operand (hmoe's widths 4..10 units), so fallback and grouped GEMMs mix."""
    cpu_vs_device(tiny_spec("hmoe.yaml", d_model=d_model), lead=(7,), training=True)
    cpu_vs_device(tiny_spec("debug-hetero.yaml", d_model=d_model), lead=(3, 5), training=True)
