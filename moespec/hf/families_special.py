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
- Aria: top-k of the logits then softmax over the k (router under ``router``); experts with
  a fixed SiLU in the transposed layout (``is_transposed``: x @ W); fused shared experts.
- DBRX: softmax, top-k, divided by the weights' p-norm with p = ``moe_normalize_expert_weights``
  (1: the sum, moespec's renormalisation; other p refused); experts as flattened
  [E·F, D] matrices w1 (gate), v1 (up), w2 (down, used as x @ w2). Fields in ``ffn_config``.
"""

from __future__ import annotations

from moespec.hf.common import ACTIVATIONS, activation, field, fused_experts, refuse, router_weight, topk
from moespec.hf.families_core import sparse_layer_types
from moespec.hf.layout import Rule
from moespec.hf.registry import STANDARD_EXPERTS, Config, Family, UnsupportedFamilyError, register
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
        "shared": Shared("shared_experts", "moe_intermediate_size", count="n_shared_experts", always=True),
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


# --- Aria and DBRX: their own expert layouts ---------------------------------------------------


def _aria_experts() -> tuple[Rule, ...]:
    """Aria's experts: ``gate_up_proj [E, D, 2F]`` (x @ W; gate columns first) and
    ``down_proj [E, F, D]``, i.e. the v5 layout transposed."""
    return (
        Rule(
            "experts.gate_up_proj", ("E", "D", "2*F"), ("experts.0.w_gate", "experts.0.w_up"),
            ("E", "F", "D"), perm=(0, 2, 1), split_dim=1,
        ),
        Rule("experts.down_proj", ("E", "F", "D"), ("experts.0.w_down",), ("E", "D", "F"), perm=(0, 2, 1)),
    )  # fmt: skip


def _aria_check(c: Config) -> None:
    refuse(c, "mlp_bias", bool, "the shared experts' biases are not mapped")


ARIA = topk_family(
    "aria", "AriaTextMoELayer", router="router", experts="moe_num_experts", width="intermediate_size",
    k="moe_topk", order="topk_then_softmax", renorm=False, act="silu", check=_aria_check,
    shared=Shared("shared_experts", "intermediate_size", count="moe_num_shared_experts", always=True),
    experts_rules=_aria_experts, experts_flags={**STANDARD_EXPERTS, "is_transposed": True},
)  # fmt: skip


def _ffn(c: Config) -> Config:
    """DBRX keeps its MoE fields in ``ffn_config`` (a DbrxConfig or the DbrxFFNConfig itself)."""
    return getattr(c, "ffn_config", c)


def _dbrx_check(c: Config) -> None:
    f = _ffn(c)
    refuse(f, "moe_jitter_eps", lambda v: v > 0, "jitters the block's input in place (router and experts)")
    refuse(
        f, "moe_normalize_expert_weights", lambda v: v != 1,
        "divides the top-k weights by their p-norm; moespec renormalises by the sum (p = 1) or not at all",
    )  # fmt: skip
    act = (f.ffn_act_fn or {}).get("name", "silu")
    if act not in ACTIVATIONS or len(f.ffn_act_fn or {}) > 1:
        raise UnsupportedFamilyError(
            f"DbrxFFNConfig.ffn_act_fn = {f.ffn_act_fn!r}: not a moespec expert activation"
        )


def _dbrx_layer(c: Config) -> dict:
    f = _ffn(c)
    act = ACTIVATIONS[(f.ffn_act_fn or {}).get("name", "silu")]
    routed = {"kind": "glu", "activation": act, "d_ff": f.ffn_hidden_size, "count": f.moe_num_experts}
    renorm = f.moe_normalize_expert_weights is not None
    return {"experts": {"routed": [routed]}, "router": topk(f.moe_top_k, score="softmax", renormalize=renorm)}


DBRX = Family(
    "dbrx",
    ("DbrxFFN",),
    "router",
    _dbrx_layer,
    lambda c: {"E": _ffn(c).moe_num_experts, "F": _ffn(c).ffn_hidden_size, "D": _ffn(c).hidden_size},
    lambda c: (
        router_weight("router.layer.weight"),
        # w1 / v1: gate / up rows of expert e at e·F .. e·F + F - 1; w2 likewise, used as x @ w2.
        Rule("experts.mlp.w1", ("E*F", "D"), ("experts.0.w_gate",), ("E", "F", "D"), view=("E", "F", "D")),
        Rule("experts.mlp.v1", ("E*F", "D"), ("experts.0.w_up",), ("E", "F", "D"), view=("E", "F", "D")),
        Rule(
            "experts.mlp.w2",
            ("E*F", "D"),
            ("experts.0.w_down",),
            ("E", "D", "F"),
            view=("E", "F", "D"),
            perm=(0, 2, 1),
        ),
    ),
    lambda c: list(range(field(c, "n_layers"))) if hasattr(c, "n_layers") else [],
    _dbrx_check,
    sources={
        "layer.experts.routed.0.count": "ffn_config.moe_num_experts",
        "layer.experts.routed.0.d_ff": "ffn_config.ffn_hidden_size",
        "layer.experts.routed.0.activation": "ffn_config.ffn_act_fn",
        "layer.router.k": "ffn_config.moe_top_k",
        "layer.router.renormalize": "ffn_config.moe_normalize_expert_weights",
    },
)

for _fam in (ARIA, DBRX):
    register(_fam)
