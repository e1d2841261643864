"""``moespec convert --from-hf CONFIG.json|MODEL_DIR -o spec.yaml``: the written spec is
moespec's own validated spec of the config (comments name the source fields); a config
moespec cannot express is exit 1 naming the field or family."""

from __future__ import annotations

from pathlib import Path

import pytest

import moespec.hf
from moespec.cli import main
from moespec.spec.load import load_spec
from tests.hf.conftest import transformers


def _qwen3(tmp_path: Path) -> tuple[Path, object]:
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=4, mlp_only_layers=[0], norm_topk_prob=False,
    )  # fmt: skip
    cfg.save_pretrained(tmp_path / "model")
    return tmp_path / "model", cfg


@pytest.mark.parametrize("as_file", [False, True], ids=["model_dir", "config_json"])
def test_convert_writes_the_validated_spec(
    tmp_path: Path, as_file: bool, capsys: pytest.CaptureFixture
) -> None:
    model_dir, cfg = _qwen3(tmp_path)
    src = model_dir / "config.json" if as_file else model_dir
    out = tmp_path / "out" / "spec.yaml"
    assert main(["convert", "--from-hf", str(src), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "num_experts_per_tok" in text and "config.norm_topk_prob" in text
    assert "Decoder layers 1-3 of 4 are MoE" in text
    loaded = load_spec(out).spec.model_dump(mode="json", exclude_defaults=True)
    want = load_spec(moespec.hf.spec_from_config(cfg)).spec.model_dump(mode="json", exclude_defaults=True)
    assert loaded == want


def test_convert_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model_dir, _ = _qwen3(tmp_path)
    assert main(["convert", "--from-hf", str(model_dir)]) == 0
    assert 'kind: "topk"' in capsys.readouterr().out


def test_convert_refuses_what_it_cannot_express(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    transformers.MixtralConfig(
        hidden_size=32, num_attention_heads=4, router_jitter_noise=0.1
    ).save_pretrained(tmp_path / "m")
    assert main(["convert", "--from-hf", str(tmp_path / "m")]) == 1
    assert "router_jitter_noise = 0.1" in capsys.readouterr().err
    transformers.PhimoeConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path / "g")
    assert main(["convert", "--from-hf", str(tmp_path / "g")]) == 1
    assert "'phimoe'" in capsys.readouterr().err
    assert main(["convert", "--from-hf", str(tmp_path / "nothing")]) == 1
    assert "cannot read a transformers config" in capsys.readouterr().err
