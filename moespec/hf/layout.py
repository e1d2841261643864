"""Declarative, reversible converters between a transformers block's tensors and a moespec
layer's state_dict keys.

A family's layout is a tuple of :class:`Rule`: one transformers tensor (its key relative to
the block) and the moespec keys it holds. Converting is a fixed pipeline, and its inverse:

    hf [hf_shape] --reshape(view)--> --permute(perm)--> --split(dim, halves | interleaved)--> ms keys

Every shape is written with the config's named dimensions (``("E", "2*F", "D")``), never read
off the tensors, so a layout is checked, not guessed: a missing or extra key, or a tensor whose
shape is not the declared one, is a :class:`~moespec.errors.BuildError` naming the key (a
tensor whose shape is the declared one transposed is called out as such). A transpose never
"happens to work" because two dimensions are equal: the permutation comes from the layout,
and the family adapter also checks the block's own ``is_transposed`` flag where it has one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import permutations

import torch
from torch import Tensor

from moespec.errors import BuildError

Dim = int | str  # an int, a dimension name ("D") or a product of them ("2*F", "S*F")


def resolve(shape: tuple[Dim, ...], dims: Mapping[str, int]) -> tuple[int, ...]:
    """The concrete shape of a symbolic one (``"2*F"`` is 2·dims["F"])."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
            continue
        factors = [int(f) if f.isdigit() else dims[f] for f in d.split("*")]
        out.append(math.prod(factors))
    return tuple(out)


def _show(shape: tuple[Dim, ...], dims: Mapping[str, int]) -> str:
    return (
        "["
        + ", ".join(
            f"{d}={v}" if isinstance(d, str) else str(v)
            for d, v in zip(shape, resolve(shape, dims), strict=True)
        )
        + "]"
    )


@dataclass(frozen=True)
class Rule:
    """One transformers tensor ``hf`` of shape ``hf_shape`` holding the moespec tensors ``ms``
    (each of shape ``ms_shape``). ``view`` reshapes the hf tensor first (a fused shared-expert
    FFN of width S·F viewed as S experts), ``perm`` permutes it (a transposed layout), then it
    is split on ``split_dim`` into ``len(ms)`` equal parts: consecutive blocks, or with
    ``interleaved`` every ``len(ms)``-th row starting at part i (gate/up interleaved)."""

    hf: str
    hf_shape: tuple[Dim, ...]
    ms: tuple[str, ...]
    ms_shape: tuple[Dim, ...]
    view: tuple[Dim, ...] | None = None
    perm: tuple[int, ...] | None = None
    split_dim: int = 0
    interleaved: bool = False

    def to_moespec(self, t: Tensor, dims: Mapping[str, int]) -> dict[str, Tensor]:
        """The moespec tensors of the hf tensor ``t`` (copies, contiguous). A rule without
        moespec keys is an empty tensor transformers builds anyway (a shared MLP of width 0):
        its shape is checked and nothing is kept."""
        want = resolve(self.hf_shape, dims)
        if tuple(t.shape) != want:
            raise BuildError(_shape_error(self.hf, tuple(t.shape), self.hf_shape, dims))
        if not self.ms:
            assert t.numel() == 0, self.hf  # only empty tensors may map to nothing
            return {}
        if self.view is not None:
            t = t.reshape(resolve(self.view, dims))
        if self.perm is not None:
            t = t.permute(self.perm)
        n = len(self.ms)
        if n == 1:
            parts = [t]
        elif self.interleaved:
            idx = [slice(None)] * t.dim()
            parts = []
            for i in range(n):
                idx[self.split_dim] = slice(i, None, n)
                parts.append(t[tuple(idx)])
        else:
            parts = list(t.chunk(n, dim=self.split_dim))
        ms_want = resolve(self.ms_shape, dims)
        out = {}
        for key, p in zip(self.ms, parts, strict=True):
            assert tuple(p.shape) == ms_want, (key, tuple(p.shape), ms_want)  # the rule is inconsistent
            out[key] = p.detach().clone().contiguous()
        return out

    def to_hf(self, tensors: Mapping[str, Tensor], dims: Mapping[str, int]) -> Tensor:
        """The hf tensor holding the moespec ``tensors`` (the inverse of :meth:`to_moespec`)."""
        if not self.ms:
            return torch.empty(resolve(self.hf_shape, dims))
        ms_want = resolve(self.ms_shape, dims)
        for key in self.ms:
            if tuple(tensors[key].shape) != ms_want:
                raise BuildError(_shape_error(key, tuple(tensors[key].shape), self.ms_shape, dims))
        parts = [tensors[k] for k in self.ms]
        if len(parts) == 1:
            t = parts[0]
        elif self.interleaved:
            t = torch.stack(parts, dim=self.split_dim + 1).flatten(self.split_dim, self.split_dim + 1)
        else:
            t = torch.cat(parts, dim=self.split_dim)
        if self.perm is not None:
            inverse = [0] * len(self.perm)
            for i, p in enumerate(self.perm):
                inverse[p] = i
            t = t.permute(inverse)
        return t.reshape(resolve(self.hf_shape, dims)).contiguous()


def _shape_error(key: str, got: tuple[int, ...], shape: tuple[Dim, ...], dims: Mapping[str, int]) -> str:
    want = resolve(shape, dims)
    msg = f"{key}: shape {list(got)}, but the layout and config say {_show(shape, dims)}"
    if len(got) == len(want) and sorted(got) == sorted(want):
        hits = [p for p in permutations(range(len(want))) if tuple(want[i] for i in p) == got]
        msg += f" (it looks permuted {hits[0]}: a transposed layout?)"
    return msg


def check_keys(given: Mapping[str, object], expected: list[str], what: str) -> None:
    """Every expected key present, nothing else: a BuildError listing both kinds otherwise."""
    missing = [k for k in expected if k not in given]
    extra = sorted(k for k in given if k not in expected)
    if missing or extra:
        lines = [f"{what}: the keys do not match the layout"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in extra]
        raise BuildError("\n".join(lines))


@dataclass(frozen=True)
class Layout:
    """A family's rules, resolved against one config's dimensions."""

    rules: tuple[Rule, ...]
    dims: Mapping[str, int]

    @property
    def hf_keys(self) -> list[str]:
        return [r.hf for r in self.rules]

    @property
    def ms_keys(self) -> list[str]:
        return [k for r in self.rules for k in r.ms]

    def to_moespec(self, hf: Mapping[str, Tensor], what: str = "transformers block") -> dict[str, Tensor]:
        """moespec state_dict from the block's tensors (keys relative to the block)."""
        check_keys(hf, self.hf_keys, what)
        out: dict[str, Tensor] = {}
        for r in self.rules:
            out.update(r.to_moespec(hf[r.hf], self.dims))
        return out

    def to_hf(self, ms: Mapping[str, Tensor], what: str = "moespec layer") -> dict[str, Tensor]:
        """The block's tensors from a moespec state_dict."""
        check_keys(ms, self.ms_keys, what)
        return {r.hf: r.to_hf(ms, self.dims) for r in self.rules}
