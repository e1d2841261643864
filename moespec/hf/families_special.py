"""Adapters for families with one trait beyond the general top-k factory, each read from
its transformers 5.25 modeling code:

- A.X-K2 (``axk2``): DeepSeek-V3's router, except that the group limit (only when ``n_group``
  is set) masks the experts of dropped groups with 0.0 on the biased scores, not -inf. Where
  the biased scores of the kept groups go negative, transformers can then pick an expert of a
  dropped group; moespec masks with -inf, as the group limit means (a documented difference;
  equal whenever the biased scores are positive).
- LongCat-Flash: softmax (fp32) over ``n_routed_experts`` FFN experts plus ``zero_expert_num``
  identity experts (moespec's ``copy`` zero-compute experts, indexed after the FFN experts,
  as transformers does), selection by softmax + the frozen ``e_score_correction_bias``, never
  renormalised, times ``routed_scaling_factor``. The router's ``classifier.bias`` is never
  applied by transformers, so ``router_bias`` is refused.
"""

from __future__ import annotations

from moespec.hf.common import activation, field, fused_experts, refuse, topk
from moespec.hf.families_core import sparse_layer_types
from moespec.hf.layout import Rule
from moespec.hf.registry import Config, Family, register
from moespec.hf.topk_family import Shared, by_config, topk_family

_ZERO_MASK = (
    "A.X-K2 masks dropped groups with 0.0 on the biased scores (transformers); moespec masks them with "
    "-inf: the two differ only where the kept groups' biased scores are negative"
)


def _axk2() -> Family:
    common = {
        "experts": "num_local_experts", "score": "sigmoid", "scaling": "routed_scaling_factor",
        "bias": ("gate.e_score_correction_bias", ("E",)), "layers": sparse_layer_types,
        "notes": (_ZERO_MASK,),
        "shared": Shared("shared_experts", "moe_intermediate_size", count="n_shared_experts"),
    }  # fmt: skip
    grouped = topk_family("axk2", "AXK2MoE", groups="top2_sum", **common)
    plain = topk_family("axk2", "AXK2MoE", **common)
    return by_config(lambda c: plain if field(c, "n_group") is None else grouped, grouped)


def _longcat_layer(c: Config) -> dict:
    routed = {
        "kind": "glu", "activation": activation(c), "d_ff": field(c, "expert_ffn_hidden_size"),
        "count": field(c, "n_routed_experts"),
    }  # fmt: skip
    router = topk(
        field(c, "moe_topk"), score="softmax", renormalize=False,
        scaling_factor=float(field(c, "routed_scaling_factor")), expert_bias={"update_rate": 0.0},
    )  # fmt: skip
    experts: dict = {"routed": [routed]}
    if field(c, "zero_expert_num"):
        experts["zero_compute"] = [{"kind": "copy", "count": field(c, "zero_expert_num")}]
    return {"experts": experts, "router": router}


def _longcat_dims(c: Config) -> dict[str, int]:
    e = field(c, "n_routed_experts")
    r = e + (field(c, "zero_expert_num") or 0)  # router rows: FFN experts, then identity experts
    return {"E": e, "R": r, "F": field(c, "expert_ffn_hidden_size"), "D": field(c, "hidden_size")}


def _longcat_check(c: Config) -> None:
    refuse(c, "router_bias", bool, "transformers creates router.classifier.bias but never applies it")


LONGCAT = Family(
    "longcat_flash",
    ("LongcatFlashMoE",),
    "router",
    _longcat_layer,
    _longcat_dims,
    lambda c: (
        Rule("router.classifier.weight", ("R", "D"), ("router.weight",), ("R", "D")),
        Rule("router.e_score_correction_bias", ("R",), ("router.expert_bias",), ("R",)),
        *fused_experts(),
    ),
    lambda c: list(range(field(c, "num_layers"))),
    _longcat_check,
    sources={
        "layer.experts.routed.0.count": "n_routed_experts",
        "layer.experts.routed.0.d_ff": "expert_ffn_hidden_size",
        "layer.experts.zero_compute": "zero_expert_num (identity experts)",
        "layer.router.k": "moe_topk",
        "layer.router.scaling_factor": "routed_scaling_factor",
        "layer.router.expert_bias": "e_score_correction_bias (a frozen buffer)",
    },
)

for _fam in (_axk2(), LONGCAT):
    register(_fam)
