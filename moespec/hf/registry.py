"""The family registry: one :class:`Family` adapter per transformers model family, keyed by the
family's module name in ``transformers.models`` (``mixtral``, ``qwen2_moe``, ...).

An adapter is data plus three small functions of the config: the moespec layer spec it
describes (``layer``), the named dimensions (``dims``) and the checkpoint layout (``rules``).
``check`` refuses a config whose MoE maths moespec cannot express, naming the field. Nothing
here imports transformers: the adapters read config attributes and block classes by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moespec.errors import BuildError
from moespec.hf.layout import Layout, Rule

Config = Any  # a transformers PretrainedConfig (duck-typed: attributes only)


# The flags of transformers' fused, gate-then-up, untransposed, bias-free v5 expert layout.
STANDARD_EXPERTS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}


class UnsupportedFamilyError(BuildError):
    """A transformers family (or one config of it) that moespec cannot take over; the message
    names the family, or the config field, and why."""


@dataclass(frozen=True)
class Family:
    """How one transformers family maps onto moespec.

    ``blocks``: class names of its MoE blocks (in ``transformers.models.<name>``);
    ``router``: the block's router submodule (its output 0 is the router logits, which
    transformers records for ``output_router_logits``); ``layer(config)``: the moespec
    ``layer:`` dict; ``dims(config)``: named sizes used by the layout; ``rules(config)``: the
    checkpoint layout; ``moe_layers(config)``: indices of the decoder layers that are MoE;
    ``check(config)``: raises for a config the maths cannot follow (names the field);
    ``notes``: documented differences from the block, shown in ``patch``'s report;
    ``sources``: spec path -> the config field it comes from (comments of
    ``moespec convert --from-hf``); ``experts_flags``: the layout flags transformers'
    ``@use_experts_implementation`` sets on the experts module that the rules assume (checked
    where the module has them, so a transposed layout cannot pass on equal dimensions);
    ``extra_outputs(config, router_logits)``: what the block returns after its output, for a
    block that returns a tuple (GPT-OSS's router scores); None: the output alone."""

    name: str
    blocks: tuple[str, ...]
    router: str
    layer: Callable[[Config], dict]
    dims: Callable[[Config], dict[str, int]]
    rules: Callable[[Config], tuple[Rule, ...]]
    moe_layers: Callable[[Config], list[int]]
    check: Callable[[Config], None] = lambda config: None
    notes: tuple[str, ...] = field(default=())
    sources: dict[str, str] = field(default_factory=dict)
    experts_flags: dict[str, bool] = field(default_factory=lambda: dict(STANDARD_EXPERTS))
    extra_outputs: Callable[[Config, Any], tuple] | None = None

    def layout(self, config: Config) -> Layout:
        """The checkpoint layout for ``config``."""
        return Layout(self.rules(config), self.dims(config))


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a name may register once)."""
    assert family.name not in FAMILIES, f"family {family.name!r} registered twice"
    FAMILIES[family.name] = family
    return family


def family_of_module(module: object) -> str | None:
    """The transformers family a block or config object comes from (``transformers.models.X.``)."""
    mod = type(module).__module__
    parts = mod.split(".")
    if len(parts) >= 3 and parts[0] == "transformers" and parts[1] == "models":
        return parts[2]
    return None
