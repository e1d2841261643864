"""The built module against the plain-PyTorch reference (``moespec.reference``), both on the
device: tests/routers/conftest.py's ``compare`` (output, aux loss, x's and every parameter's
gradient, at init and with the weights moved away from it) for one spec per router kind and
the layer features around it. (Schedules are left out: the reference takes a fixed k; the
CPU-vs-device comparison covers smoe-dropout's schedule.)"""

from __future__ import annotations

import pytest
import torch

from moespec.ir.build import build_program
from moespec.spec.load import load_spec

CASES = [
    "debug-tiny.yaml",  # top-k softmax, dropless
    "debug-base.yaml",  # jitter, position-ordered capacity, mlp + bias
    "debug-capacity.yaml",  # sigmoid, group-limited, expert bias, score-ordered dropping
    "debug-hetero.yaml",  # two expert groups, gated shared expert, zero/copy/constant experts
    "hmoe.yaml",  # heterogeneous widths, parameter-penalty loss
    "deepseek-v3.yaml",
    "sparsely-gated-moe.yaml",  # learned noise, importance/load loss
    "expert-choice.yaml",
    "remoe.yaml",  # ReLU routing, L1 controller
    "top-p-dynamic.yaml",
    "adaptive-gating.yaml",
    "soft-moe.yaml",
    "base-layers.yaml",
    "sinkhorn.yaml",
    "hash-layers.yaml",
    "x-moe.yaml",  # cosine router
    "dselect-k.yaml",
    "mh-moe.yaml",  # multi-head
    "moe-plus-plus.yaml",  # zero-compute experts, previous layer's router logits
]


@pytest.mark.parametrize("lead", [(2, 7), (9,)], ids=["2x7", "9"])
@pytest.mark.parametrize("name", CASES)
def test_module_matches_reference_on_device(
    name, lead, device, on_device, tiny_spec, make_inputs, router_conftest, move_away_on_device, request
):
    assert router_conftest.torch.linspace(-1, 1, 3).device.type == device.type  # its gradient probe
    data = tiny_spec(name, device_type=device.type)
    x = torch.randn(*lead, data["d_model"], generator=torch.Generator().manual_seed(5)).to(device)
    # Flat [T, ...] extra inputs: the reference takes no other shape.
    ir = build_program(load_spec(data).spec).layers[0]
    inputs = {k: v.to(device) for k, v in make_inputs(ir, lead, seed=7, flat=True).items()}
    with on_device():
        m, _ = router_conftest.compare(data, (), x, training=True, inputs=inputs, away=move_away_on_device)
    assert {p.device.type for p in m.state_dict().values()} == {device.type}
    assert m.aux_loss.device.type == device.type
