"""The example specs in specs/: they load, they match the committed JSON Schema, and the derived
numbers of the published models agree with their public configs.

Expected numbers are written as arithmetic over the public config values, so a reader can check
them against the config without running anything. Conventions (moespec.ir.numbers): parameters
are weights + biases (buffers such as DeepSeek-V3's expert bias are not counted); FLOPs are
forward matmul FLOPs at inference, 2 per multiply-accumulate, router GEMM included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from moespec import load_spec
from moespec.explain import explain_data
from moespec.spec.compose import compose
from moespec.spec.yamlio import load_file

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SCHEMA = ROOT / "schemas" / "moespec.v1.schema.json"
MODELINE = "# yaml-language-server: $schema=../schemas/moespec.v1.schema.json"

SPEC_FILES = sorted(SPECS.glob("*.yaml"))
SPEC_IDS = [p.name for p in SPEC_FILES]


def _layer(name: str) -> dict:
    """Derived numbers of the first (only) layer group of ``specs/<name>.yaml``."""
    return explain_data(load_spec(SPECS / f"{name}.yaml"))["layers"][0]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_expected_specs_exist():
    names = {p.stem for p in SPEC_FILES}
    expected = {
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "deepseek-v3",
        "olmoe-1b-7b",
        "switch-base-128",
        "gshard-top2",
        "sparsely-gated-moe",
        "debug-tiny",
        "debug-base",
        "debug-extends",
        "debug-groups",
        "debug-hetero",
        "debug-capacity",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", SPEC_FILES, ids=SPEC_IDS)
def test_spec_loads(path: Path):
    loaded = load_spec(path)
    assert loaded.spec.name == path.stem
    assert path.read_text(encoding="utf-8").splitlines()[0] == MODELINE


@pytest.mark.parametrize("path", SPEC_FILES, ids=SPEC_IDS)
def test_spec_matches_json_schema(path: Path, validator: jsonschema.Draft7Validator):
    """The file as written (parsed with moespec's YAML 1.2 reader), checked by `jsonschema`."""
    data = load_file(path).plain()
    if "extends" in data:
        pytest.skip("a partial spec (extends another); its composed result is checked below")
    errors = list(validator.iter_errors(data))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("path", SPEC_FILES, ids=SPEC_IDS)
def test_composed_spec_matches_json_schema(path: Path, validator: jsonschema.Draft7Validator):
    """After `extends:` and groups are resolved, the result is a complete spec."""
    data = compose(path).plain()
    errors = list(validator.iter_errors(data))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_json_schema_rejects_unknown_key(validator: jsonschema.Draft7Validator):
    data = load_file(SPECS / "debug-tiny.yaml").plain()
    data["layer"]["router"]["capacity_factr"] = 1.25
    assert list(validator.iter_errors(data))


# Per-MoE-layer numbers from the public configs. `router` = d_model * n_experts (no bias).
EXPECTED = {
    # Mixtral-8x7B (config.json): hidden 4096, intermediate 14336, 8 SwiGLU experts, top-2.
    "mixtral-8x7b": {
        "params_total": 8 * 3 * 4096 * 14336 + 4096 * 8,
        "params_active": 2 * 3 * 4096 * 14336 + 4096 * 8,
        "flops_per_token": 2 * (4096 * 8 + 2 * 3 * 4096 * 14336),
    },
    # Qwen3-30B-A3B (config.json): hidden 2048, moe_intermediate 768, 128 experts, top-8.
    "qwen3-30b-a3b": {
        "params_total": 128 * 3 * 2048 * 768 + 2048 * 128,
        "params_active": 8 * 3 * 2048 * 768 + 2048 * 128,
        "flops_per_token": 2 * (2048 * 128 + 8 * 3 * 2048 * 768),
    },
    # DeepSeek-V3 (config.json): hidden 7168, moe_intermediate 2048, 256 routed + 1 shared
    # SwiGLU expert, top-8; the e_score_correction_bias (256 values) is a buffer.
    "deepseek-v3": {
        "params_total": 256 * 3 * 7168 * 2048 + 1 * 3 * 7168 * 2048 + 7168 * 256,
        "params_active": 8 * 3 * 7168 * 2048 + 1 * 3 * 7168 * 2048 + 7168 * 256,
        "flops_per_token": 2 * (7168 * 256 + 1 * 3 * 7168 * 2048 + 8 * 3 * 7168 * 2048),
    },
    # OLMoE-1B-7B-0924 (config.json): hidden 2048, intermediate 1024, 64 experts, top-8.
    "olmoe-1b-7b": {
        "params_total": 64 * 3 * 2048 * 1024 + 2048 * 64,
        "params_active": 8 * 3 * 2048 * 1024 + 2048 * 64,
        "flops_per_token": 2 * (2048 * 64 + 8 * 3 * 2048 * 1024),
    },
    # switch-base-128 (config.json): d_model 768, d_ff 3072, 128 ReLU experts wi/wo, no biases.
    "switch-base-128": {
        "params_total": 128 * 2 * 768 * 3072 + 768 * 128,
        "params_active": 1 * 2 * 768 * 3072 + 768 * 128,
        "flops_per_token": 2 * (768 * 128 + 1 * 2 * 768 * 3072),
    },
    # GShard M4 (paper): d_model 1024, expert hidden 8192, 2048 ReLU experts, top-2. The
    # active count is for two experts; random routing drops some second experts.
    "gshard-top2": {
        "params_total": 2048 * 2 * 1024 * 8192 + 1024 * 2048,
        "params_active": 2 * 2 * 1024 * 8192 + 1024 * 2048,
        "flops_per_token": 2 * (1024 * 2048 + 2 * 2 * 1024 * 8192),
    },
    # Shazeer et al. 2017 MoE-256: d_model 512, experts 512 -> 1024 (ReLU) -> 512 with biases,
    # top-4, router W_g plus the learned noise projection W_noise (512 * 256). W_noise is in the
    # total (it is trained) but not in the active count or FLOPs, which are taken at inference.
    "sparsely-gated-moe": {
        "params_total": 256 * (512 * 1024 + 1024 + 1024 * 512 + 512) + 2 * 512 * 256,
        "params_active": 4 * (512 * 1024 + 1024 + 1024 * 512 + 512) + 512 * 256,
        "flops_per_token": 2 * (512 * 256 + 4 * 2 * 512 * 1024),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_model_layer_numbers(name: str):
    layer = _layer(name)
    got = {key: layer[key] for key in EXPECTED[name]}
    assert got == EXPECTED[name]


# (MoE layers, public total params, public active params, bounds on the ratio of the MoE
# layers' total to the public total). The rest of each model is attention, dense layers and
# embeddings, so the MoE layers must stay below the public figure but make up most of it.
WHOLE_MODEL = {
    # Mixtral-8x7B: 32 layers; 46.7B total, 12.9B active (Mistral AI, 2023).
    "mixtral-8x7b": (32, 46.7e9, 12.9e9, (0.95, 1.0)),
    # Qwen3-30B-A3B: 48 MoE layers; 30.5B total (29.9B without embeddings), 3.3B active.
    "qwen3-30b-a3b": (48, 30.5e9, 3.3e9, (0.9, 1.0)),
    # DeepSeek-V3: 61 layers, the first 3 dense, so 58 MoE layers; 671B total, 37B active.
    "deepseek-v3": (58, 671e9, 37e9, (0.95, 1.0)),
    # OLMoE-1B-7B: 16 MoE layers; 6.9B total, 1.3B active.
    "olmoe-1b-7b": (16, 6.9e9, 1.3e9, (0.9, 1.0)),
    # switch-base-128: 6 sparse encoder + 6 sparse decoder layers; 7.4B total.
    "switch-base-128": (12, 7.4e9, None, (0.95, 1.0)),
}


@pytest.mark.parametrize("name", sorted(WHOLE_MODEL))
def test_whole_model_totals(name: str):
    n_layers, total, active, (lo, hi) = WHOLE_MODEL[name]
    layer = _layer(name)
    assert lo * total < n_layers * layer["params_total"] < hi * total
    if active is not None:
        assert 0.5 * active < n_layers * layer["params_active"] < active


def test_gshard_600b():
    # MoE(2048E, 36L): every other layer of the 36 is MoE -> 18 MoE layers, "600B" in the
    # paper (a rounded figure: 18 * 34.36B = 618.5B).
    assert 0.95 * 600e9 < 18 * _layer("gshard-top2")["params_total"] < 1.1 * 600e9


def test_sparsely_gated_expert_size():
    # The paper's LM experts have "about 1 million parameters" each.
    layer = _layer("sparsely-gated-moe")
    per_expert = layer["params_routed"] / layer["n_ffn_experts"]
    assert 1.0e6 < per_expert < 1.1e6


def test_debug_extends_merges_over_base():
    loaded = load_spec(SPECS / "debug-extends.yaml")
    spec, prov = loaded.spec, loaded.provenance()
    assert spec.layer.router.k == 1
    assert spec.layer.router.jitter == 0.01  # kept from debug-base (maps merge)
    assert spec.layer.experts.routed[0].kind == "glu"  # replaced (lists replace)
    assert spec.layer.losses.z_loss is not None
    assert spec.layer.losses.load_balance is not None  # kept from debug-base
    assert spec.layer.capacity.kind == "factor"  # kept from debug-base
    assert prov["layer.router.k"].file.endswith("debug-extends.yaml")
    assert prov["layer.router.jitter"].file.endswith("debug-base.yaml")


def test_debug_groups_patch_the_base_layer():
    layers = explain_data(load_spec(SPECS / "debug-groups.yaml"))["layers"]
    assert [(x["name"], x["count"], x["experts_per_token"]) for x in layers] == [
        ("early", 2, 1),
        ("late", 3, 2),
    ]
    spec = load_spec(SPECS / "debug-groups.yaml").spec
    early, late = spec.groups[0].layer, spec.groups[1].layer
    assert early.experts.routed[0].d_ff == 64 and late.experts.routed[0].d_ff == 128
    assert early.losses.z_loss is None and late.losses.z_loss is not None


def test_debug_specs_are_tiny():
    for path in SPECS.glob("debug-*.yaml"):
        spec = load_spec(path).spec
        assert spec.d_model <= 64, path.name
        for _, _, layer in spec.layer_groups():
            assert layer.experts.n_routed <= 8, path.name


def test_explain_json_cli():
    out = subprocess.run(
        [sys.executable, "-m", "moespec", "explain", str(SPECS / "deepseek-v3.yaml"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    data = json.loads(out.stdout)
    assert data["name"] == "deepseek-v3"
    assert len(data["layers"]) == 1
    for key in ("params_total", "params_active", "flops_per_token"):
        assert data["layers"][0][key] == EXPECTED["deepseek-v3"][key]
