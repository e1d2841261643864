"""Mixtral- and DeepSeek-V3-like layers in bf16 on the device against the same layers in fp32 on
the CPU.

The fp32 layer gets the bf16 layer's weights (exactly representable in fp32) and the input
is rounded to bf16 first, so both route the same way (the router runs in fp32 in both) and
the difference is bf16 arithmetic only: output, aux loss and every gradient finite and within
3e-2 (relative to the norm). d_model 64 / d_ff 128 take grouped_mm; 100 / 200 are 200 / 400-byte
bf16 rows, so the per-expert mm loop runs where grouped_mm's alignment fails. DeepSeek-V3's
256 experts (many without rows; sigmoid, group-limited, shared expert, expert bias) take
grouped_mm with 512 rows."""

from __future__ import annotations

import pytest
import torch

import moespec


@pytest.mark.parametrize(
    "name,d_model,d_ff",
    [("mixtral-8x7b.yaml", 64, 128), ("mixtral-8x7b.yaml", 100, 200), ("deepseek-v3.yaml", 64, 32)],
    ids=["mixtral-64", "mixtral-100", "deepseek-v3-64"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_close_to_fp32_cpu(
    name, d_model, d_ff, training, device, on_device, tiny_spec, run_layer, assert_close_norm
):
    data = tiny_spec(name, d_model=d_model, dtype="bf16")
    data["target"]["router_dtype"] = "fp32"
    experts = data["layer"]["experts"]
    experts["routed"][0]["d_ff"] = d_ff
    if experts.get("shared"):
        experts["shared"]["d_ff"] = d_ff
    fp32 = {**data, "target": {**data["target"], "dtype": "fp32"}}
    bf16 = moespec.build(data, seed=4, device=device)
    assert bf16.experts_dtype == torch.bfloat16
    ref = moespec.build(fp32, seed=4, device="cpu")
    ref.load_state_dict({k: v.to(ref.state_dict()[k].dtype).cpu() for k, v in bf16.state_dict().items()})
    x = torch.randn(64, d_model, generator=torch.Generator().manual_seed(9)).bfloat16()
    want = run_layer(ref, x.float(), {}, training=training)
    with on_device():
        got = run_layer(bf16, x.to(device), {}, training=training)
    assert got.y.dtype == torch.bfloat16 and {d.type for d in got.devices} == {device.type}
    assert torch.equal(got.stats["tokens_per_expert"], want.stats["tokens_per_expert"])  # same routing
    for what, a, b in [
        ("output", got.y, want.y),
        ("aux_loss", got.aux, want.aux),
        ("x.grad", got.x_grad, want.x_grad),
    ]:
        assert a.float().isfinite().all(), what
        assert_close_norm(a.float(), b, rtol=3e-2, what=what)
    for name, g in want.grads.items():
        assert got.grads[name] is not None and got.grads[name].float().isfinite().all(), name
        assert_close_norm(got.grads[name].float(), g, rtol=3e-2, what=f"{name}.grad")


def test_gshard_counts_past_256_in_a_bf16_router(device):
    """GShard's top-1 fractions with a bf16 router on the device: 600 tokens on one expert
    count 600 (a bf16 accumulator stops at 256), so the loss is E^2 * mean(me * ce) = 1 here."""
    from moespec.common.losses import gshard_loss

    p_TE = torch.full((600, 4), 0.25, dtype=torch.bfloat16, device=device)
    top1_T = torch.zeros(600, dtype=torch.int64, device=device)
    assert gshard_loss(p_TE, top1_T).item() == 1.0
