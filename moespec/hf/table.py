"""Which transformers MoE families moespec takes over, and why not the others.

``discover()`` lists the MoE families of the *installed* transformers by reading (not
importing) each ``transformers/models/<family>/modeling_*.py``: a family is MoE when a
top-level class name ends in ``Experts``, ``Moe``/``MoE``, ``MoeBlock``, ``MoELayer``,
``SparseMLP`` or ``MoA``. ``UNSUPPORTED`` gives the reason for every MoE family without an
adapter; a test fails when ``discover()`` finds a family that neither an adapter nor this
table mentions (a newer transformers), so no family is left out silently.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

from moespec.hf.registry import FAMILIES, UnsupportedFamilyError

MOE_CLASS = re.compile(r"(Experts|Moe|MoE|MoeBlock|MoELayer|SparseMLP|MoA)$")

# Reasons, read from each family's modeling code (transformers 5.25). Phrases reused below.
_CLAMP_AFTER = (
    "experts clamp the activation's output (silu(gate) ≤ limit, limit_after_act) and the up projection "
    "with a per-layer limit (swiglu_limits[layer]); moespec's `limit` clamps the gate before the "
    "activation"
)

_NORMED_ROUTER = (
    "the router normalises and rescales its input (RMSNorm, learned scale) and each expert's "
    "weight has a learned per-expert scale; not a moespec router"
)
_LOGIT_BIAS = "selection adds the correction bias to the logits, not to the sigmoid scores moespec biases"

UNSUPPORTED: dict[str, str] = {
    "bailing_hybrid": _CLAMP_AFTER,
    "deepseek_v4": (
        "the first MoE layers route by a frozen token-id table (DeepseekV4HashRouter reads input_ids) "
        "and the block is built per layer index; not adapted yet (its clamped experts map to `limit`)"
    ),
    "step3p7": _CLAMP_AFTER,
    "phimoe": (
        "SparseMixer routing (top-2 by masked, jittered softmax with Heun straight-through "
        "gradients while training) is not a moespec router"
    ),
    "switch_transformers": (
        "capacity is an absolute expert_capacity counted along each sequence (cumsum per row), not a "
        "moespec capacity factor over the batch; experts are per-expert DenseActDense modules"
    ),
    "nllb_moe": (
        "an encoder-decoder with top-2 routing with capacity and second-expert sampling; not adapted yet"
    ),
    "vitpose_backbone": "experts are selected per dataset index (an input), not routed per token",
    "doge": "cross-domain MoE with product-key expert retrieval, not a moespec router",
    "jetmoe": (
        "its MoE MLP adds one block-level output bias that moespec's experts do not have, and its "
        "attention is a mixture of experts too (MoA)"
    ),
    "muse_spark": (
        "experts apply a norm after each expert (has_post_expert_norm), which moespec's experts do not"
    ),
    "nemotron_h": (
        "experts have no gate (has_gate=False) and project through a latent size; not adapted yet"
    ),
    "kolibri1": _LOGIT_BIAS,
    "kolibri1_1": _LOGIT_BIAS,
    "axk1": "the block applies an RMSNorm to the MoE output (post_mlp_layernorm); moespec's layer does not",
    "llama4": (
        "the routing weight scales the expert's input (expert(x·σ(logit))), not its output; "
        "moespec's experts weigh their output"
    ),
    "zaya": (
        "the router is an MLP whose hidden state flows from layer to layer (EDA), with a reserved "
        "extra class; not a moespec router"
    ),
    "gemma4": _NORMED_ROUTER,
    "diffusion_gemma": _NORMED_ROUTER,
    "inkling": (
        "the shared experts are weighted by the router (their log-sigmoid logits join the routed ones "
        "in one softmax); moespec's shared experts are ungated or sigmoid-gated"
    ),
    "ergo": "each expert's output goes through a per-expert norm (post_expert_norm), not in moespec",
    "ernie4_5_vl_moe": (
        "text and vision tokens go to separate MoEs chosen by moe_mm_token_type_ids (an input); "
        "not a moespec router"
    ),
}


def transformers_models_dir() -> Path | None:
    """``transformers/models`` of the installed transformers (not imported), or None."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@cache
def discover(models_dir: Path | None = None) -> dict[str, list[str]]:
    """The installed transformers' MoE families: family -> its MoE class names."""
    models_dir = models_dir or transformers_models_dir()
    found: dict[str, list[str]] = {}
    if models_dir is None:
        return found
    for path in sorted(models_dir.glob("*/modeling_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and MOE_CLASS.search(n.name)]
        if names:
            found.setdefault(path.parent.name, []).extend(names)
    return found


def status(family: str) -> str | None:
    """None when ``family`` is supported, else the reason it is not."""
    if family in FAMILIES:
        return None
    return UNSUPPORTED.get(family, "not in moespec's family table (a transformers newer than moespec?)")


def require(family: str) -> None:
    """Raise :class:`UnsupportedFamilyError` naming ``family`` and why, unless supported."""
    why = status(family)
    if why is not None:
        raise UnsupportedFamilyError(f"transformers family {family!r} is not supported by moespec.hf: {why}")


def rows() -> list[tuple[str, str]]:
    """(family, "parity-tested" with its documented differences, or the reason it is not
    supported) for every family moespec knows, sorted."""
    names = sorted(set(FAMILIES) | set(UNSUPPORTED))
    out = []
    for n in names:
        if n in FAMILIES:
            notes = FAMILIES[n].notes
            out.append((n, "parity-tested" + "".join(f"; {x}" for x in notes)))
        else:
            out.append((n, f"unsupported: {UNSUPPORTED[n]}"))
    return out


def markdown() -> str:
    """The family table of docs/hf.md."""
    lines = ["| transformers family | moespec.hf |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in rows()]
    return "\n".join(lines)


BEGIN, END = "<!-- hf-families:begin (python -m moespec.hf) -->", "<!-- hf-families:end -->"


def render_page(text: str) -> str:
    """``text`` (docs/hf.md) with the family table between its markers replaced."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"the page has no {BEGIN} ... {END} markers")
    return f"{head}{BEGIN}\n{markdown()}\n{END}{tail}"
