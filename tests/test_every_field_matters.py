"""Every field of the spec language does something, or is refused, or is on a short list.

The test walks every (definition, property) pair of the JSON Schema
(``schemas/moespec.v1.schema.json``: each router, capacity, loss, noise and schedule kind is a
definition of its own) and needs exactly one entry for it:

- ``CASES``: a base spec and a change of that field (plus any companion change the field cannot
  be varied without); something observable must differ between the two: explain's derived
  numbers, or the built module (state_dict keys, shapes, dtypes and values, which parameters are
  trainable, schedule values over steps) or what it computes on a fixed input with a fixed
  generator (outputs, aux loss, router logits, routing stats and gradients over two training
  steps, the state they leave, then an eval step);
- ``REFUSED``: fields whose other values are spec errors, checked to be reported at that field;
- ``ENFORCED``: target and placement fields a live module checks against this machine
  (``moespec/runtime/target.py``); the test asserts their error;
- ``DESCRIPTIVE`` / ``SECTIONS``: names and free text, or sections whose own fields are walked;
- ``DISTRIBUTED``: fields whose effect needs several ranks (named multi-process tests).

The IR is not an observable here: it holds the router, capacity and loss spec objects
verbatim, so it differs for any change, useful or not.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import moespec
from moespec.errors import SpecError, TargetError
from moespec.ir.build import build_program
from moespec.ir.model_numbers import model_numbers
from moespec.ir.numbers import spec_numbers
from moespec.runtime.network import MoENetwork
from moespec.spec.load import load_spec

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "moespec.v1.schema.json"
CUSTOM = "moespec.examples.custom_router"


def _layer(router: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A tiny spec: d_model 8, four SwiGLU experts of width 8, the given router."""
    experts = {"routed": [{"count": 4, "kind": "glu", "activation": "silu", "d_ff": 8}]}
    layer = {"experts": experts, "router": router, **extra}
    return {"moespec": 1, "name": "walk", "d_model": 8, "layer": layer}


TOPK = {"kind": "topk", "k": 2}
FACTOR = {"kind": "factor", "train_factor": 1.0, "eval_factor": 1.0, "min_capacity": 0}
TEMP_SCHEDULE = {"param": "router.temperature", "start": 1.0, "end": 4.0, "steps": 10}

BASES: dict[str, dict[str, Any]] = {
    "topk": _layer(TOPK),
    "noise_fixed": _layer({**TOPK, "noise": {"kind": "fixed", "std": 1.0}}),
    "noise_learned": _layer({**TOPK, "noise": {"kind": "learned"}}),
    "groups": _layer({**TOPK, "groups": {"n_groups": 2, "topk_groups": 1}}),
    "expert_bias": _layer({**TOPK, "expert_bias": {"update_rate": 0.1}}),
    "factor": _layer(TOPK, capacity=FACTOR),
    "switch": _layer(TOPK, losses={"load_balance": {"kind": "switch", "weight": 0.1}}),
    "gshard": _layer(TOPK, losses={"load_balance": {"kind": "gshard", "weight": 0.1}}),
    # Group-limited selection: not the plain top-k of the scores, so the two counts differ.
    "switch_groups": _layer(
        {**TOPK, "groups": {"n_groups": 2, "topk_groups": 1}},
        losses={"load_balance": {"kind": "switch", "weight": 0.1}},
    ),
    "importance": _layer(
        {**TOPK, "noise": {"kind": "fixed", "std": 1.0}},  # the loss needs router noise
        losses={
            "load_balance": {"kind": "importance_load_cv2", "importance_weight": 0.1, "load_weight": 0.1}
        },
    ),
    "z_loss": _layer(TOPK, losses={"z_loss": {"weight": 0.1}}),
    "multi_head": _layer(TOPK, multi_head={"heads": 2}),
    "linear": _layer(TOPK, schedules=[{**TEMP_SCHEDULE, "kind": "linear"}]),
    "cosine_schedule": _layer(TOPK, schedules=[{**TEMP_SCHEDULE, "kind": "cosine"}]),
    "exponential": _layer(TOPK, schedules=[{**TEMP_SCHEDULE, "kind": "exponential"}]),
    "multistep": _layer(
        TOPK,
        schedules=[
            {"param": "router.temperature", "kind": "multistep", "milestones": [3], "values": [1.0, 2.0]}
        ],
    ),
    "expert_choice": _layer({"kind": "expert_choice"}),
    "relu": _layer({"kind": "relu", "k": 2}),
    "top_p": _layer({"kind": "top_p"}),
    "adaptive_gating": _layer({"kind": "adaptive_gating"}),
    "soft_moe": _layer({"kind": "soft_moe", "group_size": 16}),
    "base": _layer({"kind": "base"}),
    "sinkhorn": _layer({"kind": "sinkhorn", "k": 2}),
    "hash": _layer({"kind": "hash", "vocab_size": 16}),
    "cosine": _layer({"kind": "cosine", "k": 2, "proj_dim": 4}),
    "dselect_k": _layer({"kind": "dselect_k", "k": 2}),
    "custom": _layer(
        {
            "kind": "custom",
            "function": f"{CUSTOM}:softmax_topk",
            "output": "topk",
            "k": 2,
            "options": {"k": 2},
        }
    ),
}
# The P-Penalty loss weights experts by size, so it needs experts of two widths; DSelect-k's
# reachability term applies only when the expert count is not a power of 2.
HETERO = [
    {"count": 2, "kind": "glu", "activation": "silu", "d_ff": 8},
    {"count": 2, "kind": "glu", "activation": "silu", "d_ff": 16},
]
for name, base, loss in (("hetero_switch", "switch", "switch"), ("penalty", "switch", "parameter_penalty")):
    BASES[name] = copy.deepcopy(BASES[base])
    BASES[name]["layer"]["experts"]["routed"] = copy.deepcopy(HETERO)
    BASES[name]["layer"]["losses"]["load_balance"]["kind"] = loss
BASES["dselect_k5"] = copy.deepcopy(BASES["dselect_k"])
BASES["dselect_k5"]["layer"]["experts"]["routed"][0]["count"] = 5
# Zero-compute experts and shared experts extend the experts section of the top-k base.
BASES["zero_compute"] = copy.deepcopy(BASES["topk"])
BASES["zero_compute"]["layer"]["experts"]["zero_compute"] = [{"kind": "constant", "count": 1}]
BASES["shared"] = copy.deepcopy(BASES["topk"])
BASES["shared"]["layer"]["experts"]["shared"] = {"kind": "glu", "activation": "silu", "d_ff": 8}
BASES["spec_groups"] = {**BASES["topk"], "groups": [{"name": "a", "layer": {}}]}
# A tiny network: 3 blocks, MoE at 0 and 2 (every 2), a dense FFN at 1.
MODEL = {
    "kind": "decoder_lm",
    "vocab_size": 16,
    "blocks": 3,
    "max_seq_len": 16,
    "attention": {"heads": 2},
    "norm": {"kind": "rmsnorm"},
    "dense_ffn": {"kind": "glu", "activation": "silu", "d_ff": 8},
    "moe_blocks": {"kind": "every", "every": 2},
}
BASES["model"] = {**BASES["topk"], "model": MODEL}
BASES["encoder"] = {**BASES["topk"], "model": {**MODEL, "kind": "encoder"}}
BASES["model_first_dense"] = {
    **BASES["topk"],
    "model": {**MODEL, "moe_blocks": {"kind": "first_dense", "count": 1}},
}
BASES["model_list"] = {**BASES["topk"], "model": {**MODEL, "moe_blocks": {"kind": "list", "blocks": [1]}}}
BASES["model_groups"] = {
    **BASES["topk"],
    "groups": [{"name": "a", "layer": {"router": {"k": 1}}}, {"name": "b", "layer": {}}],
    "model": MODEL,
}


@dataclass(frozen=True)
class Case:
    """Change ``change`` (dotted path -> value, list indices as numbers) on ``BASES[base]``;
    ``x_scale`` scales the input (large router logits, as a trained router has)."""

    base: str
    change: dict[str, Any] = field(default_factory=dict)
    x_scale: float = 1.0


R = "layer.router"
ROUTED = "layer.experts.routed.0"
SHARED = "layer.experts.shared"
LB = "layer.losses.load_balance"
SCHED = "layer.schedules.0"

ATT = "model.attention"
MODEL_CASES: dict[str, Case] = {
    "Spec.model": Case("topk", {"model": MODEL}),
    "AttentionSpec.heads": Case("model", {f"{ATT}.heads": 4}),
    "AttentionSpec.kv_heads": Case("model", {f"{ATT}.kv_heads": 1}),
    "AttentionSpec.head_dim": Case("model", {f"{ATT}.head_dim": 8}),
    "AttentionSpec.rope_theta": Case("model", {f"{ATT}.rope_theta": 100.0}),
    "AttentionSpec.qk_norm": Case("model", {f"{ATT}.qk_norm": "head"}),
    "AttentionSpec.bias": Case("model", {f"{ATT}.bias": True}),
    "NormSpec.kind": Case("model", {"model.norm.kind": "layernorm"}),
    "NormSpec.eps": Case("model", {"model.norm.eps": 0.5}),
    "DenseFFNSpec.kind": Case("model", {"model.dense_ffn.kind": "mlp"}),
    "DenseFFNSpec.activation": Case("model", {"model.dense_ffn.activation": "relu"}),
    "DenseFFNSpec.d_ff": Case("model", {"model.dense_ffn.d_ff": 16}),
    "DenseFFNSpec.bias": Case("model", {"model.dense_ffn.bias": True}),
    "AllMoE.kind": Case("model", {"model.moe_blocks": {"kind": "all"}}),
    "EveryMoE.kind": Case("model_list", {"model.moe_blocks": {"kind": "every", "every": 2}}),
    "EveryMoE.every": Case("model", {"model.moe_blocks.every": 1}),
    "EveryMoE.offset": Case("model", {"model.moe_blocks.offset": 1}),
    "FirstDenseMoE.kind": Case("model", {"model.moe_blocks": {"kind": "first_dense", "count": 1}}),
    "FirstDenseMoE.count": Case("model_first_dense", {"model.moe_blocks.count": 2}),
    "ListMoE.kind": Case("model", {"model.moe_blocks": {"kind": "list", "blocks": [1]}}),
    "ListMoE.blocks": Case("model_list", {"model.moe_blocks.blocks": [0, 1]}),
    "DecoderLMSpec.kind": Case("model", {"model.kind": "encoder"}),
    "DecoderLMSpec.tie_embeddings": Case("model", {"model.tie_embeddings": True}),
    "EncoderSpec.kind": Case("encoder", {"model.kind": "decoder_lm"}),
    "EncoderSpec.pool": Case("encoder", {"model.pool": "first"}),
    "EncoderSpec.classes": Case("encoder", {"model.classes": 3}),
}
for _kind, _base in (("DecoderLMSpec", "model"), ("EncoderSpec", "encoder")):
    MODEL_CASES |= {
        f"{_kind}.vocab_size": Case(_base, {"model.vocab_size": 32}),
        f"{_kind}.pad_token_id": Case(_base, {"model.pad_token_id": 0}),
        f"{_kind}.blocks": Case(_base, {"model.blocks": 4}),
        f"{_kind}.max_seq_len": Case(_base, {"model.max_seq_len": 32}),
        f"{_kind}.moe_blocks": Case(_base, {"model.moe_blocks": {"kind": "all"}}),
        f"{_kind}.init_std": Case(_base, {"model.init_std": 0.5}),
        f"{_kind}.dense_ffn": Case(_base, {"model.dense_ffn.d_ff": 16}),
    }
MODEL_CASES["DecoderLMSpec.moe_layers"] = Case("model_groups", {"model.moe_layers": ["b", "a"]})
MODEL_CASES["EncoderSpec.moe_layers"] = Case(
    "model_groups", {"model.kind": "encoder", "model.moe_layers": ["b", "a"]}
)

CASES: dict[str, Case] = {
    **MODEL_CASES,
    # Top level and target
    "Spec.d_model": Case("topk", {"d_model": 16}),
    "Spec.groups": Case("topk", {"groups": [{"name": "a", "layer": {"router": {"k": 1}}}]}),
    "Spec.target": Case("topk", {"target": {"dtype": "fp64"}}),
    "GroupSpec.count": Case("spec_groups", {"groups.0.count": 3}),
    "TargetSpec.dtype": Case("topk", {"target": {"dtype": "fp64"}}),
    "TargetSpec.router_dtype": Case("topk", {"target": {"router_dtype": "fp64"}}),
    # Layer sections
    "LayerSpec.capacity": Case("topk", {"layer.capacity": FACTOR}),
    "LayerSpec.losses": Case("topk", {"layer.losses": {"z_loss": {"weight": 0.1}}}),
    "LayerSpec.multi_head": Case("topk", {"layer.multi_head": {"heads": 2}}),
    "LayerSpec.schedules": Case("topk", {"layer.schedules": [{**TEMP_SCHEDULE, "kind": "linear"}]}),
    "MultiHeadSpec.heads": Case("multi_head", {"layer.multi_head.heads": 4}),
    "MultiHeadSpec.bias": Case("multi_head", {"layer.multi_head.bias": False}),
    # Experts
    "ExpertsSpec.shared": Case("topk", {SHARED: {"kind": "mlp", "activation": "relu", "d_ff": 8}}),
    "ExpertsSpec.zero_compute": Case("topk", {"layer.experts.zero_compute": [{"kind": "zero"}]}),
    "RoutedExpertGroup.kind": Case("topk", {f"{ROUTED}.kind": "mlp"}),
    "RoutedExpertGroup.activation": Case("topk", {f"{ROUTED}.activation": "gelu"}),
    "RoutedExpertGroup.d_ff": Case("topk", {f"{ROUTED}.d_ff": 16}),
    "RoutedExpertGroup.bias": Case("topk", {f"{ROUTED}.bias": True}),
    "RoutedExpertGroup.init": Case("topk", {f"{ROUTED}.init": {"std": 0.5}}),
    "RoutedExpertGroup.count": Case("topk", {f"{ROUTED}.count": 6}),
    "RoutedExpertGroup.granularity": Case("topk", {f"{ROUTED}.granularity": 2}),
    "RoutedExpertGroup.limit": Case("topk", {f"{ROUTED}.limit": 0.01}),
    "RoutedExpertGroup.alpha": Case("topk", {f"{ROUTED}.alpha": 5.0}),
    "RoutedExpertGroup.up_offset": Case("topk", {f"{ROUTED}.up_offset": 1.0}),
    "RoutedExpertGroup.gate_softcap": Case("topk", {f"{ROUTED}.gate_softcap": 0.01}),
    "RoutedExpertGroup.up_softcap": Case("topk", {f"{ROUTED}.up_softcap": 0.01}),
    "InitSpec.kind": Case("topk", {f"{ROUTED}.init": {"kind": "uniform_fan_in"}}),
    "InitSpec.std": Case("topk", {f"{ROUTED}.init": {"std": 0.5}}),
    "InitSpec.output_scale": Case("topk", {f"{ROUTED}.init": {"output_scale": 0.5}}),
    "SharedExperts.kind": Case("shared", {f"{SHARED}.kind": "mlp"}),
    "SharedExperts.activation": Case("shared", {f"{SHARED}.activation": "relu"}),
    "SharedExperts.d_ff": Case("shared", {f"{SHARED}.d_ff": 16}),
    "SharedExperts.bias": Case("shared", {f"{SHARED}.bias": True}),
    "SharedExperts.init": Case("shared", {f"{SHARED}.init": {"std": 0.5}}),
    "SharedExperts.count": Case("shared", {f"{SHARED}.count": 2}),
    "SharedExperts.gate": Case("shared", {f"{SHARED}.gate": True}),
    "SharedExperts.limit": Case("shared", {f"{SHARED}.limit": 0.01}),
    "SharedExperts.alpha": Case("shared", {f"{SHARED}.alpha": 5.0}),
    "SharedExperts.up_offset": Case("shared", {f"{SHARED}.up_offset": 1.0}),
    "SharedExperts.gate_softcap": Case("shared", {f"{SHARED}.gate_softcap": 0.01}),
    "SharedExperts.up_softcap": Case("shared", {f"{SHARED}.up_softcap": 0.01}),
    "ZeroComputeExperts.kind": Case("zero_compute", {"layer.experts.zero_compute.0.kind": "copy"}),
    "ZeroComputeExperts.count": Case("zero_compute", {"layer.experts.zero_compute.0.count": 2}),
    # Capacity
    "Dropless.kind": Case("factor", {"layer.capacity": {"kind": "dropless"}}),
    "CapacityFactor.kind": Case("topk", {"layer.capacity": FACTOR}),
    "CapacityFactor.train_factor": Case("factor", {"layer.capacity.train_factor": 0.5}),
    "CapacityFactor.eval_factor": Case("factor", {"layer.capacity.eval_factor": 0.5}),
    "CapacityFactor.min_capacity": Case("factor", {"layer.capacity.min_capacity": 40}),
    "CapacityFactor.drop_policy": Case("factor", {"layer.capacity.drop_policy": "score"}),
    # Losses
    "LossesSpec.load_balance": Case("z_loss", {LB: {"kind": "switch", "weight": 0.1}}),
    "LossesSpec.z_loss": Case("switch", {"layer.losses.z_loss": {"weight": 0.1}}),
    "ZLoss.weight": Case("z_loss", {"layer.losses.z_loss.weight": 0.2}),
    "SwitchLoss.kind": Case("gshard", {LB: {"kind": "switch", "weight": 0.1}}),
    "SwitchLoss.weight": Case("switch", {f"{LB}.weight": 0.2}),
    "SwitchLoss.scope": Case("switch", {f"{LB}.scope": "sequence"}),
    "SwitchLoss.count": Case("switch_groups", {f"{LB}.count": "unbiased_topk"}),
    "GShardLoss.kind": Case("switch", {LB: {"kind": "gshard", "weight": 0.1}}),
    "GShardLoss.weight": Case("gshard", {f"{LB}.weight": 0.2}),
    "GShardLoss.scope": Case("gshard", {f"{LB}.scope": "sequence"}),
    "ImportanceLoadLoss.kind": Case("importance", {LB: {"kind": "switch", "weight": 0.1}}),
    "ImportanceLoadLoss.importance_weight": Case("importance", {f"{LB}.importance_weight": 0.2}),
    "ImportanceLoadLoss.load_weight": Case("importance", {f"{LB}.load_weight": 0.2}),
    "ImportanceLoadLoss.scope": Case("importance", {f"{LB}.scope": "sequence"}),
    "ParameterPenaltyLoss.kind": Case("hetero_switch", {f"{LB}.kind": "parameter_penalty"}),
    "ParameterPenaltyLoss.weight": Case("penalty", {f"{LB}.weight": 0.2}),
    "ParameterPenaltyLoss.scope": Case("penalty", {f"{LB}.scope": "sequence"}),
    # Schedules (router.temperature from 1 to 4 over 10 steps). A scheduled k must stay within
    # the spec's k (2), so scheduling router.k instead also ends at 2.
    **{
        f"{name}Schedule.{f}": Case(base, {f"{SCHED}.{f}": v, **extra})
        for name, base in (
            ("Linear", "linear"),
            ("Cosine", "cosine_schedule"),
            ("Exponential", "exponential"),
        )
        for f, v, extra in (
            ("param", "router.k", {f"{SCHED}.end": 2.0}),
            ("start", 2.0, {}),
            ("end", 8.0, {}),
            ("steps", 20, {}),
            ("start_step", 3, {}),
        )
    },
    "LinearSchedule.kind": Case("cosine_schedule", {f"{SCHED}.kind": "linear"}),
    "CosineSchedule.kind": Case("linear", {f"{SCHED}.kind": "cosine"}),
    "ExponentialSchedule.kind": Case("linear", {f"{SCHED}.kind": "exponential"}),
    "MultiStepSchedule.kind": Case(
        "linear",
        {
            SCHED: {
                "param": "router.temperature",
                "kind": "multistep",
                "milestones": [3],
                "values": [1.0, 2.0],
            }
        },
    ),
    "MultiStepSchedule.param": Case(
        "multistep", {SCHED: {"param": "router.k", "kind": "multistep", "milestones": [3], "values": [1, 2]}}
    ),
    "MultiStepSchedule.milestones": Case("multistep", {f"{SCHED}.milestones": [5]}),
    "MultiStepSchedule.values": Case("multistep", {f"{SCHED}.values": [1.0, 3.0]}),
    # Top-k router
    "TopKRouter.kind": Case("expert_choice", {R: TOPK}),
    "TopKRouter.k": Case("topk", {f"{R}.k": 1}),
    "TopKRouter.score": Case("topk", {f"{R}.score": "sigmoid"}),
    "TopKRouter.order": Case("topk", {f"{R}.order": "topk_then_softmax"}),
    "TopKRouter.renormalize": Case("topk", {f"{R}.renormalize": True}),
    "TopKRouter.scaling_factor": Case("topk", {f"{R}.scaling_factor": 2.0}),
    "TopKRouter.temperature": Case("topk", {f"{R}.temperature": 2.0}),
    "TopKRouter.bias": Case("topk", {f"{R}.bias": True}),
    "TopKRouter.dtype": Case("topk", {f"{R}.dtype": "fp64"}),
    "TopKRouter.jitter": Case("topk", {f"{R}.jitter": 0.5}),
    "TopKRouter.noise": Case("topk", {f"{R}.noise": {"kind": "fixed", "std": 1.0}}),
    "TopKRouter.groups": Case("topk", {f"{R}.groups": {"n_groups": 2, "topk_groups": 1}}),
    "TopKRouter.expert_bias": Case("topk", {f"{R}.expert_bias": {"update_rate": 0.1}}),
    "TopKRouter.gating_residual": Case("topk", {f"{R}.gating_residual": True}),
    "TopKRouter.logit_std": Case("topk", {f"{R}.logit_std": 2.0}),
    "TopKRouter.trainable": Case("topk", {f"{R}.trainable": False}),
    "TopKRouter.second_expert_policy": Case("topk", {f"{R}.second_expert_policy": "random"}),
    "FixedNoise.kind": Case("noise_learned", {f"{R}.noise": {"kind": "fixed", "std": 1.0}}),
    "FixedNoise.std": Case("noise_fixed", {f"{R}.noise.std": 2.0}),
    "LearnedNoise.kind": Case("noise_fixed", {f"{R}.noise": {"kind": "learned"}}),
    "LearnedNoise.epsilon": Case("noise_learned", {f"{R}.noise.epsilon": 1.0}),
    "GroupLimited.n_groups": Case("groups", {f"{R}.groups.n_groups": 1}),
    "GroupLimited.topk_groups": Case("groups", {f"{R}.groups.topk_groups": 2}),
    "GroupLimited.group_score": Case("groups", {f"{R}.groups.group_score": "max"}),
    "ExpertBias.update_rate": Case("expert_bias", {f"{R}.expert_bias.update_rate": 0.5}),
    # Other routers
    "ExpertChoiceRouter.kind": Case("topk", {R: {"kind": "expert_choice"}}),
    "ExpertChoiceRouter.capacity_factor": Case("expert_choice", {f"{R}.capacity_factor": 1.0}),
    "ExpertChoiceRouter.eval_capacity_factor": Case("expert_choice", {f"{R}.eval_capacity_factor": 1.0}),
    "ExpertChoiceRouter.min_capacity": Case("expert_choice", {f"{R}.min_capacity": 40}),
    "ExpertChoiceRouter.group_size": Case("expert_choice", {f"{R}.group_size": 4}),
    "ExpertChoiceRouter.bias": Case("expert_choice", {f"{R}.bias": True}),
    "ExpertChoiceRouter.dtype": Case("expert_choice", {f"{R}.dtype": "fp64"}),
    "ReLURouter.kind": Case("topk", {R: {"kind": "relu", "k": 2}}),
    "ReLURouter.k": Case("relu", {f"{R}.k": 1}),
    "ReLURouter.l1_coeff_init": Case("relu", {f"{R}.l1_coeff_init": 0.5}),
    "ReLURouter.l1_multiplier": Case("relu", {f"{R}.l1_multiplier": 2.0}),
    "ReLURouter.jitter": Case("relu", {f"{R}.jitter": 0.5}),
    "ReLURouter.dtype": Case("relu", {f"{R}.dtype": "fp64"}),
    "TopPRouter.kind": Case("topk", {R: {"kind": "top_p"}}),
    "TopPRouter.threshold": Case("top_p", {f"{R}.threshold": 0.9}),
    "TopPRouter.max_k": Case("top_p", {f"{R}.threshold": 0.9, f"{R}.max_k": 1}),
    "TopPRouter.renormalize": Case("top_p", {f"{R}.renormalize": True}),
    "TopPRouter.entropy_weight": Case("top_p", {f"{R}.entropy_weight": 0.5}),
    "TopPRouter.expected_k": Case("top_p", {f"{R}.expected_k": 3.0}),
    "TopPRouter.dtype": Case("top_p", {f"{R}.dtype": "fp64"}),
    "AdaptiveGatingRouter.kind": Case("topk", {R: {"kind": "adaptive_gating"}}),
    "AdaptiveGatingRouter.threshold": Case("adaptive_gating", {f"{R}.threshold": 0.0}),
    "AdaptiveGatingRouter.weights": Case("adaptive_gating", {f"{R}.weights": "raw"}),
    "AdaptiveGatingRouter.expected_k": Case("adaptive_gating", {f"{R}.expected_k": 1.5}),
    "AdaptiveGatingRouter.dtype": Case("adaptive_gating", {f"{R}.dtype": "fp64"}),
    "SoftMoERouter.kind": Case("topk", {R: {"kind": "soft_moe", "group_size": 16}}),
    "SoftMoERouter.slots_per_expert": Case("soft_moe", {f"{R}.slots_per_expert": 2}),
    "SoftMoERouter.normalize": Case("soft_moe", {f"{R}.normalize": False}),
    "SoftMoERouter.group_size": Case("soft_moe", {f"{R}.group_size": 64}),
    "SoftMoERouter.dtype": Case("soft_moe", {f"{R}.dtype": "fp64"}),
    "BaseLayerRouter.kind": Case("topk", {R: {"kind": "base"}}),
    "BaseLayerRouter.centroid_gain": Case("base", {f"{R}.centroid_gain": 1.0}),
    "BaseLayerRouter.mix_residual": Case("base", {f"{R}.mix_residual": False}),
    "SinkhornRouter.kind": Case("topk", {R: {"kind": "sinkhorn", "k": 2}}),
    "SinkhornRouter.k": Case("sinkhorn", {f"{R}.k": 1}),
    "SinkhornRouter.score": Case("sinkhorn", {f"{R}.score": "sigmoid"}),
    # Near-uniform logits (an untrained router) balance in one Sinkhorn round: scale them up.
    "SinkhornRouter.iterations": Case("sinkhorn", {f"{R}.iterations": 1}, x_scale=100.0),
    "SinkhornRouter.tol": Case("sinkhorn", {f"{R}.tol": 0.5}, x_scale=100.0),
    "HashRouter.kind": Case("topk", {R: {"kind": "hash", "vocab_size": 16}}),
    "HashRouter.vocab_size": Case("hash", {f"{R}.vocab_size": 32}),
    "HashRouter.hash": Case("hash", {f"{R}.hash": "modulo"}),
    "HashRouter.seed": Case("hash", {f"{R}.seed": 1}),
    "HashRouter.k": Case("hash", {f"{R}.k": 2}),
    "CosineRouter.kind": Case("topk", {R: {"kind": "cosine", "k": 2}}),
    "CosineRouter.k": Case("cosine", {f"{R}.k": 1}),
    "CosineRouter.proj_dim": Case("cosine", {f"{R}.proj_dim": 8}),
    "CosineRouter.temperature": Case("cosine", {f"{R}.temperature": 1.0}),
    "CosineRouter.learnable_temperature": Case("cosine", {f"{R}.learnable_temperature": True}),
    "CosineRouter.normalize_tokens": Case("cosine", {f"{R}.normalize_tokens": False}),
    "CosineRouter.renormalize": Case("cosine", {f"{R}.renormalize": True}),
    "CosineRouter.dtype": Case("cosine", {f"{R}.dtype": "fp64"}),
    "DSelectKRouter.kind": Case("topk", {R: {"kind": "dselect_k", "k": 2}}),
    "DSelectKRouter.k": Case("dselect_k", {f"{R}.k": 1}),
    "DSelectKRouter.gamma": Case("dselect_k", {f"{R}.gamma": 0.1}),
    "DSelectKRouter.entropy_weight": Case("dselect_k", {f"{R}.entropy_weight": 0.5}),
    "DSelectKRouter.reachability_weight": Case("dselect_k5", {f"{R}.reachability_weight": 0.5}),
    "DSelectKRouter.dtype": Case("dselect_k", {f"{R}.dtype": "fp64"}),
    # A custom router's function and output go together: each function returns one form.
    "CustomRouter.kind": Case("topk", {R: BASES["custom"]["layer"]["router"]}),
    "CustomRouter.function": Case(
        "custom", {R: {"kind": "custom", "function": f"{CUSTOM}:above_uniform", "output": "dense", "k": 2}}
    ),
    "CustomRouter.output": Case(
        "custom", {R: {"kind": "custom", "function": f"{CUSTOM}:above_uniform", "output": "dense", "k": 2}}
    ),
    "CustomRouter.k": Case("custom", {f"{R}.k": 1, f"{R}.options.k": 1}),
    "CustomRouter.options": Case("custom", {f"{R}.options.temperature": 2.0}),
}

# Fields whose every other value is a spec error (causal use of a non-causal router).
REFUSED: dict[str, Case] = {
    "ExpertChoiceRouter.autoregressive": Case("expert_choice", {f"{R}.autoregressive": True}),
    "SoftMoERouter.autoregressive": Case("soft_moe", {f"{R}.autoregressive": True}),
}

# Names, free text and the language version: no effect on what is built, by design.
DESCRIPTIVE: dict[str, str] = {
    "Spec.moespec": "the spec language version (one value)",
    "Spec.name": "the design's name (artifact manifest, reports)",
    "Spec.description": "free text shown by explain",
    "Spec.extends": "composition: resolved into the other fields before anything is built",
    "GroupSpec.name": "names the group (build(layer=...), explain rows)",
}

# Required sections: their own definition's fields are walked.
SECTIONS: dict[str, str] = {
    "Spec.layer": "LayerSpec",
    "Spec.placement": "PlacementSpec (its fields are enforced)",
    "GroupSpec.layer": "LayerSpec (a patch over the top-level layer)",
    "LayerSpec.experts": "ExpertsSpec",
    "LayerSpec.router": "the router kinds",
    "ExpertsSpec.routed": "RoutedExpertGroup",
    "DecoderLMSpec.attention": "AttentionSpec",
    "DecoderLMSpec.norm": "NormSpec",
    "EncoderSpec.attention": "AttentionSpec",
    "EncoderSpec.norm": "NormSpec",
}


def _enforce_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TargetError, match=r"^target\.device: cuda"):
        moespec.build(_spec("topk", {"target": {"device": "cuda"}}))


def _enforce_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TargetError, match=r"^target\.backend: triton"):
        moespec.build(_spec("topk", {"target": {"backend": "triton", "device": "cuda"}}), device="cpu")


def _enforce_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(TargetError, match=r"^target\.arch: sm90"):
        moespec.build(_spec("topk", {"target": {"device": "cuda", "arch": "sm90"}}))


def _enforce_expert_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = moespec.build(_spec("topk", {"placement": {"expert_parallel": 2}}))
    with pytest.raises(TargetError, match=r"^placement\.expert_parallel: 2"):
        layer(torch.randn(3, 8))


def _enforce_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    # A mapping places experts only over expert_parallel > 1 ranks, which a layer enforces.
    ranks = {
        m: build_program(load_spec(_spec("topk", {"placement": {"expert_parallel": 2, "mapping": m}})).spec)
        .layers[0]
        .placement.expert_to_rank
        for m in ("contiguous", "round_robin")
    }
    assert ranks == {"contiguous": (0, 0, 1, 1), "round_robin": (0, 1, 0, 1)}
    _enforce_expert_parallel(monkeypatch)


ENFORCED = {
    "TargetSpec.device": _enforce_device,
    "TargetSpec.backend": _enforce_backend,
    "TargetSpec.arch": _enforce_arch,
    "PlacementSpec.expert_parallel": _enforce_expert_parallel,
    "PlacementSpec.mapping": _enforce_mapping,
}

# Fields that change only what several ranks compute together; one process is the same
# either way, so each names the multi-process test that shows its effect.
DISTRIBUTED: dict[str, str] = {
    "ZLoss.scope": "tests/parallel/test_expert_parallel.py::test_global_scope (the z-loss over "
    "every rank's tokens; one process: the same tokens either way)",
}

TABLES = (CASES, REFUSED, DESCRIPTIVE, SECTIONS, ENFORCED, DISTRIBUTED)


def schema_fields() -> list[str]:
    """``Definition.property`` for every property of every definition, and ``Spec.*``."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    out = [f"Spec.{p}" for p in schema["properties"]]
    for name, d in schema["definitions"].items():
        out += [f"{name}.{p}" for p in d.get("properties", {})]
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    node: Any = tree
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _spec(base: str, change: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(BASES[base])
    for path, value in change.items():
        _set(spec, path, copy.deepcopy(value))
    return spec


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.detach().clone()
    else:
        out[prefix] = value


def _run(layer: moespec.api.MoELayer, out: dict[str, Any], x_scale: float) -> None:
    """What ``layer`` is and computes: two training steps (with backward), then eval."""
    gen = torch.Generator().manual_seed(1)
    layer.generator = torch.Generator().manual_seed(2)
    x = (x_scale * torch.randn(4, 16, layer.d_model, generator=gen)).to(layer.dtype)
    inputs = {}
    if layer.ir.router.kind == "hash":
        inputs["input_ids"] = torch.randint(0, 16, (4, 16), generator=gen)
    _flat("state", layer.state_dict(), out)
    out["trainable"] = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    if layer.ir.schedules:
        for step in (0, 1, 2, 3, 4, 5, 7, 9, 12, 15, 20, 25, 1000):
            layer.set_step(step)
            _flat(f"schedule@{step}", layer.schedule_values(), out)
        layer.set_step(0)
    for mode, steps in (("train", 2), ("eval", 1)):
        layer.train(mode == "train")
        for i in range(steps):
            y = layer(x, **inputs)
            _flat(f"{mode}{i}", {"y": y, "aux": layer.aux_loss, "logits": layer.router_logits}, out)
            _flat(f"{mode}{i}.stats", layer.routing_stats, out)
            if mode == "train":
                (y.float().sum() + layer.aux_loss).backward()
    _flat("grad", {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}, out)
    _flat("state_after", layer.state_dict(), out)


def _run_network(net: MoENetwork, out: dict[str, Any]) -> None:
    """What a network is and computes: two training steps with labels, then eval."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, net.ir.vocab_size, (2, 8), generator=gen)
    labels = ids if net.kind == "decoder_lm" else torch.randint(0, 2, (2,), generator=gen)
    _flat("net.state", net.state_dict(), out)
    for mode, steps in (("train", 2), ("eval", 1)):
        net.train(mode == "train")
        for i in range(steps):
            has_head = net.kind == "decoder_lm" or net.ir.classes
            res = net(ids, labels=labels if has_head else None)
            _flat(f"net.{mode}{i}", res._asdict(), out)
            if mode == "train":
                (res.loss if res.loss is not None else res.logits.sum() + net.aux_loss()).backward()
    _flat("net.grad", {n: p.grad for n, p in net.named_parameters() if p.grad is not None}, out)


def observe(spec: dict[str, Any], x_scale: float = 1.0) -> dict[str, Any]:
    """Everything observable about a spec: explain's numbers and each layer group's module
    (and, with a `model:` section, the network's numbers and what it computes)."""
    loaded = load_spec(spec)
    out: dict[str, Any] = {"numbers": [asdict(n) for n in spec_numbers(loaded.spec)]}
    if loaded.spec.model is not None:
        out["model_numbers"] = asdict(model_numbers(loaded.spec))
        torch.manual_seed(0)
        _run_network(moespec.build(loaded, seed=0), out)
    for name, _, _ in loaded.spec.layer_groups():
        torch.manual_seed(0)
        layer = moespec.build(loaded, layer=name, seed=0)
        part: dict[str, Any] = {}
        _run(layer, part, x_scale)
        out.update({f"{name}:{k}": v for k, v in part.items()})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    return type(a) is type(b) and a == b


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys present in one only, or whose values differ."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or not _same(a[k], b[k])]


_BASE_OBS: dict[tuple[str, float], dict[str, Any]] = {}


def test_every_schema_field_has_an_entry():
    fields = schema_fields()
    missing = [f for f in fields if not any(f in t for t in TABLES)]
    assert not missing, (
        f"schema fields with no entry in {__file__}: {missing}. Add each to CASES (a base spec and a "
        "change that must alter the numbers or the built module), or to REFUSED / ENFORCED (assert the "
        "error), or, for a name or free text, to DESCRIPTIVE with the reason."
    )
    stale = [k for t in TABLES for k in t if k not in fields]
    assert not stale, f"entries for fields the schema no longer has: {stale}"
    double = [f for f in fields if sum(f in t for t in TABLES) > 1]
    assert not double, f"fields listed more than once: {double}"


@pytest.mark.parametrize("key", sorted(CASES))
def test_field_changes_something(key: str):
    case = CASES[key]
    key_ = (case.base, case.x_scale)
    if key_ not in _BASE_OBS:
        _BASE_OBS[key_] = observe(BASES[case.base], case.x_scale)
    changed = observe(_spec(case.base, case.change), case.x_scale)
    assert differences(_BASE_OBS[key_], changed), (
        f"{key}: changing {case.change} on base {case.base!r} changes neither explain's numbers nor the "
        "built module nor what it computes: the field does nothing"
    )


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_field_value_is_refused(key: str):
    case = REFUSED[key]
    observe(BASES[case.base])  # the base itself is fine
    with pytest.raises(SpecError) as e:
        load_spec(_spec(case.base, case.change))
    path = next(iter(case.change)).removeprefix("layer.router.")
    assert any(d.path.endswith(path) for d in e.value.diagnostics), str(e.value)


@pytest.mark.parametrize("key", sorted(ENFORCED))
def test_field_is_enforced(key: str, monkeypatch: pytest.MonkeyPatch):
    ENFORCED[key](monkeypatch)
