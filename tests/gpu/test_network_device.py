"""Whole networks (a spec's `model:` section) and `moespec train` on the device: the network
built on the device equals the one built on the CPU (logits, loss, every gradient), bf16 runs,
the trainer trains and resumes there, and a triton network runs its kernels (CUDA only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moespec
from moespec.train.loop import TrainConfig, train

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tiny-decoder.yaml"
SMALL = ["d_model=32", "model.blocks=3", "layer.experts.routed.0.d_ff=32", "model.dense_ffn.d_ff=32"]


def _ids(device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0)).to(device)


def _loss_and_grads(net: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    net.zero_grad(set_to_none=True)
    res = net(ids, labels=ids)
    res.loss.backward()
    return res.logits.detach(), res.loss.detach(), {n: p.grad for n, p in net.named_parameters()}


def test_network_on_device_equals_cpu(device, on_device, assert_close_norm):
    cpu = moespec.build(SPEC, SMALL, seed=4).train()
    dev = moespec.build(SPEC, SMALL, seed=4, device=device).train()
    assert next(dev.parameters()).device.type == device.type
    want = _loss_and_grads(cpu, _ids(torch.device("cpu")))
    with on_device():
        got = _loss_and_grads(dev, _ids(device))
    assert_close_norm(got[0], want[0], rtol=1e-5, what="logits")
    assert_close_norm(got[1], want[1], rtol=1e-5, what="loss")
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        assert_close_norm(got[2][n], want[2][n], rtol=1e-4, what=f"{n}.grad")


def test_bf16_network_on_device(device, on_device, assert_close_norm):
    ref = moespec.build(SPEC, SMALL, seed=4, device=device).eval()
    half = moespec.build(SPEC, [*SMALL, "+target.dtype=bf16"], seed=4, device=device).eval()
    assert next(half.parameters()).dtype == torch.bfloat16
    with on_device(), torch.no_grad():
        a, b = ref(_ids(device)).logits, half(_ids(device)).logits
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert_close_norm(b.float(), a, rtol=5e-2, what="bf16 logits")


def test_train_and_resume_on_device(device, on_device, tmp_path: Path):
    """Three steps then three more on the same run equal six in one go (the loss per step,
    to the device's reduction-order tolerance), and the loss falls."""
    cfg = dict(batch_size=4, seq_len=32, warmup=2, horizon=6, log_every=1, save_every=3, device=str(device))
    with on_device():
        train(SPEC, SMALL, out=tmp_path / "a", cfg=TrainConfig(steps=3, **cfg))
        train(SPEC, SMALL, out=tmp_path / "a", cfg=TrainConfig(steps=6, **cfg))
        train(SPEC, SMALL, out=tmp_path / "b", cfg=TrainConfig(steps=6, **cfg))
    rows = {r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in "ab"}  # fmt: skip
    assert [r["step"] for r in rows["a"]] == [r["step"] for r in rows["b"]] == list(range(1, 7))
    for x, y in zip(rows["a"], rows["b"], strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(y["loss"]), (x, y)
    assert rows["b"][-1]["loss"] < rows["b"][0]["loss"]


def test_triton_network_runs_its_kernels(device, assert_close_norm):
    if device.type != "cuda":
        pytest.skip("the Triton kernels run on CUDA here (the interpreter tests cover the CPU)")
    pytest.importorskip("triton")
    ref = moespec.build(SPEC, SMALL, seed=4, device=device).train()
    tri = moespec.build(SPEC, [*SMALL, "+target.backend=triton"], seed=4, device=device).train()
    want, got = _loss_and_grads(ref, _ids(device)), _loss_and_grads(tri, _ids(device))
    assert_close_norm(got[0], want[0], rtol=1e-4, what="logits")
    for n in want[2]:
        assert_close_norm(got[2][n], want[2][n], rtol=1e-3, what=f"{n}.grad")
