"""``patch(model)``: every MoE block of a transformers model replaced in place by a moespec
layer holding its weights, keeping the model's contract.

The replacement (:class:`PatchedBlock`) returns what the family's block returns, and keeps a
router tap under the block's router name whose class is a subclass of the family's router
class: transformers records ``router_logits`` (for ``output_router_logits`` and the
load-balancing loss) with forward hooks on that class, so the tap's output 0, the moespec
layer's router logits, is recorded as the block's router's was (hooks already installed on
the old router move to the tap). Its ``state_dict`` speaks the block's layout (keys and
shapes, through the family's reversible layout), so ``save_pretrained`` writes a checkpoint
the unpatched model loads, and ``load_state_dict`` of such a checkpoint fills the moespec
layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from moespec.errors import BuildError
from moespec.hf.convert import _check_block, family_of, from_block, spec_from_config
from moespec.hf.layout import Layout
from moespec.hf.registry import FAMILIES, Family, UnsupportedFamilyError, family_of_module
from moespec.hf.table import MOE_CLASS, require
from moespec.runtime.layer import MoELayer

_TAPS: dict[type, type] = {}


class _RouterTap:
    """Mixin of the router tap: forward(logits) returns (logits,), which is what transformers'
    router-logits hooks read (output 0)."""

    def forward(self, logits_TE: Tensor) -> tuple[Tensor]:
        return (logits_TE,)

    def extra_repr(self) -> str:
        return "router logits of the moespec layer (a tap for transformers' output recorders)"


def _tap(router: nn.Module) -> nn.Module:
    """A parameter-free module whose class subclasses ``type(router)`` (so transformers'
    isinstance-based output recorders match it), carrying ``router``'s forward hooks."""
    cls = type(router)
    tap_cls = _TAPS.get(cls)
    if tap_cls is None:
        tap_cls = type(f"MoespecTap{cls.__name__}", (_RouterTap, cls), {"__module__": __name__})
        _TAPS[cls] = tap_cls
    tap = tap_cls.__new__(tap_cls)
    nn.Module.__init__(tap)
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(tap, attr).update(getattr(router, attr))
    return tap


class PatchedBlock(nn.Module):
    """A family's MoE block run by a moespec layer (``self.moe``): same inputs, same return."""

    def __init__(
        self,
        layer: MoELayer,
        family: Family,
        layout: Layout,
        router: nn.Module,
        block_class: str,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.moe = layer
        self.router_name = family.router
        self.add_module(family.router, _tap(router))
        object.__setattr__(self, "_layout", layout)
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_config", config)  # read by family.extra_outputs
        self.block_class = block_class
        self._register_state_dict_hook(_to_hf_keys)
        self._register_load_state_dict_pre_hook(_from_hf_keys, with_module=True)

    def forward(self, hidden_states: Tensor) -> Tensor | tuple[Tensor, ...]:
        # The block's output, followed by what the family's block also returns (GPT-OSS: its
        # router scores); router logits are recorded by a hook on the tap.
        y = self.moe(hidden_states)
        getattr(self, self.router_name)(self.moe.router_logits)
        extra = self._family.extra_outputs
        if extra is None:
            return y
        return (y, *extra(self._config, self.moe.router_logits))

    def extra_repr(self) -> str:
        return f"replaces={self.block_class} ({self._family.name})"


def _to_hf_keys(module: PatchedBlock, state: dict[str, Tensor], prefix: str, _meta: Any) -> dict[str, Tensor]:
    inner = prefix + "moe."
    ms = {k[len(inner) :]: state.pop(k) for k in list(state) if k.startswith(inner)}
    for k, t in module._layout.to_hf(ms, what=f"{prefix}moe state_dict").items():
        state[prefix + k] = t
    return state


def _from_hf_keys(module: PatchedBlock, state: dict[str, Tensor], prefix: str, *_args: Any) -> None:
    hf_keys = module._layout.hf_keys
    if not any(prefix + k in state for k in hf_keys):
        return  # already in moespec keys (or missing: load_state_dict reports it)
    hf = {k: state.pop(prefix + k) for k in hf_keys if prefix + k in state}
    for k, t in module._layout.to_moespec(hf, what=f"{prefix or 'block'} state_dict").items():
        state[prefix + "moe." + k] = t


@dataclass
class Replaced:
    """One replaced block: its module name, family, class, spec and documented differences."""

    name: str
    family: str
    block_class: str
    spec: dict
    notes: tuple[str, ...] = ()


@dataclass
class PatchReport:
    """What :func:`patch` replaced."""

    replaced: list[Replaced] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"moespec.hf.patch: {len(self.replaced)} MoE block(s) replaced"]
        for r in self.replaced:
            lines.append(f"  {r.name}: {r.block_class} ({r.family}) -> moespec layer {r.spec['name']!r}")
        notes = sorted({n for r in self.replaced for n in r.notes})
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE block of a supported family inside ``model``. Any other
    module that looks like an MoE block or experts (``table.MOE_CLASS``) outside those blocks
    is an error naming it: its family is unsupported (and why), or the family's adapter does
    not map that block (a vision or talker MoE beside the adapted text block)."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{b}.") for b, _ in found):
            continue  # inside a block being replaced
        fam, cls = family_of_module(m), type(m).__name__
        if fam in FAMILIES and cls in FAMILIES[fam].blocks:
            found.append((name, m))
        elif fam is not None and MOE_CLASS.search(cls):
            require(fam)
            raise UnsupportedFamilyError(
                f"{name}: {cls} of transformers family {fam!r} is not adapted by moespec.hf "
                f"(it maps {list(FAMILIES[fam].blocks)})"
            )
    return found


def patch(model: nn.Module) -> PatchReport:
    """Replace every MoE block of ``model`` in place (see the module docstring). All blocks
    are converted before any is swapped, so an error (an unsupported family or config field,
    a layout mismatch, all naming what) leaves the model untouched."""
    blocks = _moe_blocks(model)
    if not blocks:
        raise BuildError(f"{type(model).__name__} holds no transformers MoE block")
    fallback = getattr(model, "config", None)
    if fallback is not None and hasattr(fallback, "get_text_config"):
        fallback = fallback.get_text_config()
    plans = []
    for name, block in blocks:
        fam = family_of(block)
        config = _check_block(fam, block, None if _has_config(block) else fallback)
        layer = from_block(block, config)
        replacement = PatchedBlock(
            layer, fam, fam.layout(config), getattr(block, fam.router), type(block).__name__, config
        )
        replacement.train(block.training)
        plans.append(
            (
                name,
                replacement,
                Replaced(name, fam.name, type(block).__name__, spec_from_config(config), fam.notes),
            )
        )
    report = PatchReport()
    for name, replacement, rep in plans:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, replacement)
        report.replaced.append(rep)
    return report


def _has_config(block: nn.Module) -> bool:
    from moespec.hf.convert import config_of

    return config_of(block) is not None
