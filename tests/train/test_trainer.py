"""moespec train: the schedule, the data order, a few steps, exact resume, the files a run
writes, the PNG writer and the CLI (single run and --compare). Tiny sizes: the whole file
runs in seconds."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moespec.cli import main
from moespec.errors import BuildError
from moespec.train import TrainConfig, lr_at, read_metrics, train
from moespec.train import data as tdata
from moespec.train.plots import png_bytes

SPEC = str(Path(__file__).resolve().parents[2] / "specs" / "tiny-decoder.yaml")
SMALL = ["d_model=32", "model.blocks=2", "layer.experts.routed.0.d_ff=32", "model.dense_ffn.d_ff=32"]
CFG = dict(batch_size=4, seq_len=32, warmup=2, log_every=2, save_every=3, seed=5)


def test_lr_schedule_by_hand():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=2, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 10) == 0.5 and lr_at(1, cfg, 10) == 1.0
    assert lr_at(2, cfg, 10) == pytest.approx(1.0)  # the cosine starts at its top
    assert lr_at(6, cfg, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_at(10, cfg, 10) == pytest.approx(0.1) and lr_at(50, cfg, 10) == pytest.approx(0.1)


def test_batches_are_a_function_of_seed_and_step():
    corpus = tdata.corpus()
    a = tdata.batch(corpus, 7, 3, 16, seed=1)
    assert torch.equal(a, tdata.batch(corpus, 7, 3, 16, seed=1))
    assert not torch.equal(a, tdata.batch(corpus, 8, 3, 16, seed=1))
    assert a.dtype == torch.int64 and a.shape == (3, 16) and int(a.max()) < tdata.VOCAB
    text = tdata.decode(corpus[:2000])
    assert "." in text and "=" in text and text.isascii()


def _ckpt(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:08d}.safetensors"))


def test_train_writes_a_run_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rows = train(SPEC, SMALL, out=straight, cfg=TrainConfig(steps=6, **CFG))
    train(SPEC, SMALL, out=resumed, cfg=TrainConfig(steps=3, horizon=6, **CFG))
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3]
    again = train(SPEC, SMALL, out=resumed, cfg=TrainConfig(steps=6, **CFG))
    # The same weights, AdamW state and RNG state as the uninterrupted run, bit for bit.
    a, b = _ckpt(straight, 6), _ckpt(resumed, 6)
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The resumed run also logged step 3, where its first part ended.
    assert {r["step"]: r["loss"] for r in again} == {
        **{r["step"]: r["loss"] for r in rows},
        3: again[2]["loss"],
    }
    assert [r["step"] for r in rows] == [1, 2, 4, 6]
    row = rows[-1]
    assert {
        "step",
        "loss",
        "aux_loss",
        "lr",
        "tokens_per_s",
        "dropped_fraction",
        "router_entropy",
    } <= row.keys()
    assert len(row["expert_load"]) == 1 and sum(row["expert_load"][0]) == pytest.approx(1.0, abs=1e-3)
    assert row["loss"] < rows[0]["loss"]
    for png in ("loss.png", "expert_load.png"):
        assert (straight / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Nothing to do once done; another spec or setting is refused.
    assert train(SPEC, SMALL, out=straight, cfg=TrainConfig(steps=6, **CFG))[-1]["step"] == 6
    with pytest.raises(BuildError, match="another spec"):
        train(SPEC, [*SMALL, "layer.router.k=1"], out=straight, cfg=TrainConfig(steps=8, **CFG))
    with pytest.raises(BuildError, match="another config"):
        train(SPEC, SMALL, out=straight, cfg=TrainConfig(steps=8, **{**CFG, "batch_size": 2}))


def test_png_round_trip():
    img = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    raw = png_bytes(img)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    (length,) = struct.unpack(">I", raw[8:12])
    w, h = struct.unpack(">II", raw[16:24])
    assert (w, h, length) == (7, 5, 13)
    idat = raw.index(b"IDAT")
    (n,) = struct.unpack(">I", raw[idat - 4 : idat])
    rows = zlib.decompress(raw[idat + 4 : idat + 4 + n])
    got = torch.tensor(list(rows)).view(5, 1 + 7 * 3)
    assert (got[:, 0] == 0).all() and torch.equal(got[:, 1:].view(5, 7, 3).byte(), img)


def test_cli_train_and_compare(tmp_path, capsys):
    other = tmp_path / "top1.yaml"
    other.write_text(f"moespec: 1\nname: tiny-top1\nextends: {SPEC}\nlayer:\n  router:\n    k: 1\n")
    args = [*SMALL, "--steps", "2", "--batch", "2", "--seq-len", "16", "--log-every", "1"]
    assert main(["train", SPEC, *args, "--out", str(tmp_path / "one")]) == 0
    assert "2 steps: loss" in capsys.readouterr().out
    assert main(["train", *args, "--out", str(tmp_path / "cmp"), "--compare", SPEC, str(other)]) == 0
    out = capsys.readouterr().out
    assert "tiny-decoder" in out and "tiny-top1" in out
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in table] == ["tiny-decoder", "tiny-top1"]
    assert (
        table[1]["params_active"] < table[0]["params_active"]
        and table[0]["params_total"] == table[1]["params_total"]
    )
    assert (tmp_path / "cmp" / "compare.png").exists() and (
        tmp_path / "cmp" / "1-tiny-top1" / "metrics.jsonl"
    ).exists()
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "x")]) == 2


def test_heatmap_colours():
    from moespec.train.plots import MARGIN, heatmap

    img = heatmap(torch.tensor([[0.5, 0.25], [-1.0, -1.0], [0.0, 0.0]]))
    top, mid, low = img[MARGIN + 5, MARGIN + 5], img[200, MARGIN + 5], img[-MARGIN - 5, MARGIN + 5]
    assert (
        top.tolist() == [8, 48, 107] and mid.tolist() == [200, 200, 200] and low.tolist() == [255, 255, 255]
    )
    half = img[MARGIN + 5, -MARGIN - 5].tolist()  # 0.25 of the top 0.5: halfway to white
    assert half == [round(255 + 0.5 * (c - 255)) for c in (8, 48, 107)]
