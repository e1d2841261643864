"""HMoE: heterogeneous expert widths with the parameter-penalty (P-Penalty) loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moespec
from moespec.common.losses import parameter_penalty_loss, relative_sizes_E, switch_loss

SPECS = Path(__file__).resolve().parents[2] / "specs"
HMOE = str(SPECS / "hmoe.yaml")
SMALL = (
    "d_model=32",
    "layer.experts.routed.0.d_ff=4",
    "layer.experts.routed.1.d_ff=8",
    "layer.experts.routed.2.d_ff=12",
    "layer.experts.routed.3.d_ff=16",
)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_module_matches_reference(compare, training, scope):
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    compare(HMOE, (*SMALL, f"layer.losses.load_balance.scope={scope}"), x, training=training)


def test_penalty_is_switch_loss_for_equal_sizes():
    p = torch.rand(10, 4).softmax(-1)
    sel = torch.zeros(10, 4, dtype=torch.bool)
    sel[torch.arange(10), torch.randint(0, 4, (10,))] = True
    same = parameter_penalty_loss(p, sel, 1, torch.full((4,), 7.0))
    torch.testing.assert_close(same, switch_loss(p, sel, 1))


def test_penalty_prefers_small_experts():
    sizes = torch.tensor([1.0, 1.0, 3.0, 3.0])
    p = torch.full((8, 4), 0.25)
    to_small = torch.zeros(8, 4, dtype=torch.bool)
    to_small[:, 0] = True
    to_large = torch.zeros(8, 4, dtype=torch.bool)
    to_large[:, 3] = True
    assert parameter_penalty_loss(p, to_small, 1, sizes) < parameter_penalty_loss(p, to_large, 1, sizes)
    # Its gradient pushes probability from large experts toward small ones.
    logits = torch.zeros(8, 4, requires_grad=True)
    parameter_penalty_loss(logits.softmax(-1), torch.ones(8, 4, dtype=torch.bool), 4, sizes).backward()
    assert (logits.grad[:, 2:] > logits.grad[:, :2]).all()


def test_relative_sizes_follow_the_spec():
    spec = moespec.load_spec(HMOE).spec
    sizes = relative_sizes_E(spec.layer, spec.d_model)
    assert sizes.tolist() == [3.0 * 1024 * w for w in (256, 256, 768, 768, 1280, 1280, 1792, 1792)]


def test_expert_sizes_are_not_checkpoint_state():
    m = moespec.build(HMOE, SMALL)
    assert not any("expert_sizes" in k for k in m.state_dict()) and not list(m.buffers())
    m(torch.randn(5, 32))
    assert m.aux_loss.requires_grad
