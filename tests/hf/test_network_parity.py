"""Whole networks against transformers' causal LMs (Mixtral, Qwen3-MoE, OLMoE): the network
``moespec.hf.network_from_model`` makes of a tiny random model (unit-scale weights) gives
its logits and loss (fp32, 1e-5); ``network_to_model`` is the exact inverse; ``save_hf`` /
``moespec export DIR --to-hf OUT`` write a checkpoint transformers loads with the same
logits; every unsupported config field, layout key and spec is a loud error naming it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import moespec
import moespec.hf
from moespec.cli import main
from moespec.errors import BuildError
from moespec.spec.load import load_spec
from tests.hf.conftest import eager, transformers

SPECS = Path(__file__).resolve().parents[2] / "specs"
D, F, E, K, V, BLOCKS, HEADS, KV = 16, 8, 4, 2, 50, 3, 4, 2
BASE = dict(
    vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
    num_key_value_heads=KV, num_experts_per_tok=K, max_position_embeddings=32, pad_token_id=None,
    eos_token_id=None, bos_token_id=None,
)  # fmt: skip

CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=E)),
    "qwen3_moe": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(num_experts=E, moe_intermediate_size=F, intermediate_size=12, head_dim=8, norm_topk_prob=True,
             mlp_only_layers=[1], attention_bias=True),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=E, norm_topk_prob=False)),
    "olmoe_pad": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=E, pad_token_id=1)),  # OLMoE's default
    "olmoe_tied": (
        "OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=E, norm_topk_prob=True, tie_word_embeddings=True)
    ),
}  # fmt: skip


def _config(case: str, **changes: Any) -> Any:
    cfg_name, _, extra = CASES[case]
    return eager(getattr(transformers, cfg_name)(**{**BASE, **extra, **changes}))


@torch.no_grad()
def _model(case: str, seed: int = 0, **changes: Any) -> nn.Module:
    """A tiny random model with unit-scale weights: N(0, 1/fan_in) for every parameter (the
    rotary buffers stay)."""
    model = getattr(transformers, CASES[case][1])(_config(case, **changes)).float().eval()
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_network_from_model_gives_transformers_logits_and_loss(case: str) -> None:
    hf = _model(case)
    net = moespec.hf.network_from_model(hf).eval()
    ids = _ids()
    with torch.no_grad():
        want, got = hf(input_ids=ids, labels=ids), net(ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.ce_loss, want.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.loss, got.ce_loss)  # the spec carries no auxiliary loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_gradient_equals_transformers(case: str) -> None:
    hf = _model(case).train()
    net = moespec.hf.network_from_model(hf).train()
    ids = _ids()
    hf(input_ids=ids, labels=ids).loss.backward()
    net(ids, labels=ids).loss.backward()
    layout = moespec.hf.network.network_layout(hf.config)
    got = layout.to_hf({k: p.grad for k, p in net.named_parameters()})
    want = {k: p.grad for k, p in hf.named_parameters()}
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_the_padding_row_gets_no_gradient_as_in_transformers() -> None:
    """`pad_token_id` maps to `model.pad_token_id`: the padding token's embedding row gets a
    zero gradient in both models although the batch holds it, and the other rows match."""
    hf = _model("olmoe_pad").train()
    net = moespec.hf.network_from_model(hf).train()
    assert net.ir.pad_token_id == 1
    ids = _ids()
    ids[:, ::3] = 1
    hf(input_ids=ids, labels=ids).loss.backward()
    net(ids, labels=ids).loss.backward()
    want, got = hf.model.embed_tokens.weight.grad, net.embed_tokens.weight.grad
    assert not got[1].any() and not want[1].any() and want[2:].abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert moespec.hf.to_hf_model(net).config.pad_token_id == 1
    fresh = moespec.build(SPECS / "tiny-decoder.yaml", ["+model.pad_token_id=0"])
    assert not fresh.embed_tokens.weight[0].any() and fresh.embed_tokens.weight[1].any()


@pytest.mark.parametrize("case", sorted(CASES))
def test_network_to_model_round_trips_exactly(case: str) -> None:
    src, dst = _model(case, seed=0), _model(case, seed=1)
    moespec.hf.network_to_model(moespec.hf.network_from_model(src), dst)
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["qwen3_moe", "olmoe_tied", "olmoe_pad"])
def test_save_hf_loads_in_transformers(case: str, tmp_path: Path) -> None:
    hf = _model(case)
    net = moespec.hf.network_from_model(hf).eval()
    moespec.hf.save_hf(net, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(back).__name__ == CASES[case][1]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, net(ids).logits, atol=1e-5, rtol=1e-5)
    a, b = hf.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_to_hf_model_computes_what_the_network_computes() -> None:
    net = moespec.hf.network_from_model(_model("mixtral")).eval()
    hf = moespec.hf.to_hf_model(net)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, net(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_window_as_long_as_the_context_is_no_window() -> None:
    spec = moespec.hf.network_spec_from_config(_config("mixtral", sliding_window=32))
    assert spec["model"]["max_seq_len"] == 32


SHRUNK = {
    "mixtral-8x7b": "MixtralForCausalLM",
    "qwen3-30b-a3b": "Qwen3MoeForCausalLM",
    "olmoe-1b-7b": "OlmoeForCausalLM",
}


def _shrunk(name: str) -> list[str]:
    head_dim = [] if name == "olmoe-1b-7b" else ["model.attention.head_dim=4"]
    return [
        f"d_model={D}", f"layer.experts.routed.0.d_ff={F}", f"layer.experts.routed.0.count={E}",
        f"layer.router.k={K}", f"model.vocab_size={V}", f"model.blocks={BLOCKS}", "model.max_seq_len=32",
        f"model.attention.heads={HEADS}", f"model.attention.kv_heads={KV}", "target.dtype=fp32",
        f"model.init_std={1 / math.sqrt(D)}", *head_dim,
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_export_to_hf_of_an_artifact(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art, out = tmp_path / "art", tmp_path / "hf"
    assert main(["build", str(SPECS / f"{name}.yaml"), *_shrunk(name), "-o", str(art)]) == 0
    assert main(["export", str(art), "--to-hf", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    net = moespec.load(art).eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(back).__name__ == SHRUNK[name]
    ids = _ids()
    with torch.no_grad():
        want = net(ids).logits
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0.1  # not the trivial logits of tiny weights
    assert back.config.tie_word_embeddings is False and back.config.output_router_logits is False
    again = moespec.hf.network_from_model(back)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "changes", "named"),
    [
        ("olmoe", dict(clip_qkv=2.0), "clip_qkv"),
        ("mixtral", dict(sliding_window=8), "sliding_window"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "sliding_window"),
        ("mixtral", dict(attention_dropout=0.1), "attention_dropout"),
        ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
        (
            "qwen3_moe",
            dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
            "rope_type",
        ),
        ("olmoe", dict(head_dim=8), "head_dim"),
    ],
)
def test_a_config_field_the_network_cannot_follow_is_named(case: str, changes: dict, named: str) -> None:
    with pytest.raises(BuildError, match=named):
        moespec.hf.network_spec_from_config(_config(case, **changes))


def test_a_family_without_a_network_adapter_is_named() -> None:
    cfg = transformers.Qwen2MoeConfig(**{**BASE, "num_experts": E, "moe_intermediate_size": F})
    with pytest.raises(BuildError, match=r"qwen2_moe.*whole networks: \['mixtral', 'olmoe', 'qwen3_moe'\]"):
        moespec.hf.network_spec_from_config(cfg)


def test_missing_extra_and_misshapen_keys_are_named() -> None:
    hf = _model("mixtral")
    cfg, state = hf.config, dict(hf.state_dict())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(BuildError, match=r"missing: model.layers.1.self_attn.k_proj.weight"):
        moespec.hf.network_from_state_dict(cfg, missing)
    with pytest.raises(BuildError, match=r"unexpected: model.layers.0.extra"):
        moespec.hf.network_from_state_dict(cfg, {**state, "model.layers.0.extra": torch.zeros(1)})
    bad = {**state, "model.layers.2.self_attn.o_proj.weight": torch.zeros(D, D + 1)}
    with pytest.raises(BuildError, match=r"model.layers.2.self_attn.o_proj.weight: shape \[16, 17\]"):
        moespec.hf.network_from_state_dict(cfg, bad)
    swapped = {**state, "model.layers.0.mlp.experts.down_proj": torch.zeros(E, F, D)}
    with pytest.raises(BuildError, match=r"down_proj.*transposed"):
        moespec.hf.network_from_state_dict(cfg, swapped)


def test_network_to_model_refuses_another_design() -> None:
    net = moespec.hf.network_from_model(_model("olmoe"))
    with pytest.raises(BuildError, match="router differ"):
        moespec.hf.network_to_model(net, _model("olmoe_tied"))


DENSE = [
    "model.moe_blocks={kind: every, every: 2, offset: 1}",
    "model.dense_ffn={kind: glu, activation: silu, d_ff: 12}",
]


def test_export_of_dense_blocks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art, out = tmp_path / "art", tmp_path / "hf"
    assert (
        main(["build", str(SPECS / "qwen3-30b-a3b.yaml"), *_shrunk("qwen3-30b-a3b"), *DENSE, "-o", str(art)])
        == 0
    )
    assert main(["export", str(art), "--to-hf", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert back.config.mlp_only_layers == [0, 2]
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=ids).logits, moespec.load(art)(ids).logits, atol=1e-5, rtol=1e-5
        )
    # Mixtral's attention and routing with dense blocks: no family has both.
    art2 = tmp_path / "art2"
    assert (
        main(["build", str(SPECS / "mixtral-8x7b.yaml"), *_shrunk("mixtral-8x7b"), *DENSE, "-o", str(art2)])
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(art2), "--to-hf", str(tmp_path / "hf2")]) == 1
    err = capsys.readouterr().err
    assert "mixtral: model.moe_blocks" in err and "qwen3_moe: model.attention" in err


def test_network_from_model_needs_the_causal_lm() -> None:
    hf = _model("mixtral")
    with pytest.raises(
        BuildError, match="MixtralModel: a moespec network maps the causal LM MixtralForCausalLM"
    ):
        moespec.hf.network_from_model(hf.model)


def test_export_keeps_the_dtype(tmp_path: Path) -> None:
    art, out = tmp_path / "art", tmp_path / "hf"
    assert main(["build", str(SPECS / "olmoe-1b-7b.yaml"), *_shrunk("olmoe-1b-7b"), "target.dtype=bf16",
                 "-o", str(art)]) == 0  # fmt: skip
    assert main(["export", str(art), "--to-hf", str(out)]) == 0
    assert main(["export", str(art), "--to-hf", str(out)]) == 1  # exists
    assert main(["export", str(art), "--to-hf", str(out), "--force"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    net = moespec.load(art)
    assert all(
        torch.equal(v, back.state_dict()[k]) for k, v in moespec.hf.to_hf_model(net).state_dict().items()
    )


def test_export_of_a_network_no_family_matches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art = tmp_path / "art"
    assert main(["build", str(SPECS / "tiny-decoder.yaml"), "-o", str(art)]) == 0
    capsys.readouterr()
    assert main(["export", str(art), "--to-hf", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "matches no transformers family" in err and "mixtral:" in err and "olmoe:" in err
    assert not (tmp_path / "hf").exists()


def test_export_of_a_layer_artifact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    art = tmp_path / "art"
    assert main(["build", str(SPECS / "mixtral-8x7b.yaml"), *_shrunk("mixtral-8x7b"), "--layer", "layer",
                 "-o", str(art)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(art), "--to-hf", str(tmp_path / "hf")]) == 1
    assert "layer artifact" in capsys.readouterr().err


def test_convert_network_writes_the_model_section(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = _config("qwen3_moe")
    cfg.save_pretrained(tmp_path / "model")
    out = tmp_path / "spec.yaml"
    assert main(["convert", "--from-hf", str(tmp_path / "model"), "--network", "-o", str(out)]) == 0
    text = out.read_text()
    assert "# config.mlp_only_layers" not in text and "decoder_sparse_step, mlp_only_layers" in text
    assert "the others are the model's dense_ffn" in text
    loaded = load_spec(out).spec.model_dump(mode="json", exclude_defaults=True)
    want = load_spec(moespec.hf.network_spec_from_config(cfg)).spec.model_dump(
        mode="json", exclude_defaults=True
    )
    assert loaded == want and loaded["model"]["moe_blocks"] == {"kind": "list", "blocks": [0, 2]}
    hf = _model("qwen3_moe")
    net = moespec.build(out).eval()
    net.load_state_dict(moespec.hf.network_from_model(hf).state_dict())
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(net(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_greedy_generate_gives_transformers_tokens() -> None:
    hf = _model("qwen3_moe")
    net = moespec.hf.network_from_model(hf)
    ids = _ids()[:1, :5]
    want = hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(net.generate(ids, max_new_tokens=6), want)


# The published configs (config.json of mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B,
# allenai/OLMoE-1B-7B-0924; the fields that set the network).
def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


PUBLISHED = {
    "mixtral-8x7b": transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, rope_parameters=_rope(1e6), num_local_experts=8, num_experts_per_tok=2,
    ),
    "qwen3-30b-a3b": transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters=_rope(1e6),
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
    ),
    "olmoe-1b-7b": transformers.OlmoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
        clip_qkv=None, rope_parameters=_rope(10000.0), num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_example_specs_are_their_published_networks(name: str) -> None:
    """specs/<name>.yaml's `model:` section and layer are what transformers builds of the
    published config (so `export --to-hf` of a full-size artifact would find its family)."""
    from moespec.hf.network import differences
    from moespec.ir.build import build_program

    program = build_program(load_spec(SPECS / f"{name}.yaml").spec)
    assert program.model is not None
    layers = {lay.name: lay for lay in program.layers}
    moe = [layers[b] for b in program.model.blocks if b is not None]
    assert differences(program.model, moe, PUBLISHED[name]) == []
