"""Render the Triton kernel templates of one specialisation.

Each kernel is one template, ``templates/triton/<name>.py.jinja``, rendered with a strict
jinja2 environment (a missing variable is an error). What varies per spec is fixed in the text
(the activation and its derivative, GLU or not, bias or not, exact fp32 dots for fp32; the
router's score, order, renormalisation and group score); what varies per call (sizes, flags
of a call site) stays a kernel argument or ``tl.constexpr``. Each rendered file starts with a
header naming the moespec version, the spec and its hash, the template and the
specialisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from moespec.codegen.templates import environment

EXPERT_KERNELS = (
    "expert_up",
    "expert_rows_gemm",
    "expert_down_backward",
    "expert_wgrad",
    "segment_sum",
    "combine",
)
ROUTER_KERNELS = ("topk_route",)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
DTYPES = ("fp32", "bf16", "fp16")


def glu_options(activation: str) -> tuple[str, dict[str, float]]:
    """The expert ops' ``activation`` argument (``FFNSpec.op_activation``: ``silu`` or
    ``silu;limit=7.0;alpha=1.702;up_offset=1.0``) as (name, clamped-GLU options)."""
    name, *opts = activation.split(";")
    kw = {k: float(v) for k, v in (o.split("=", 1) for o in opts)}
    silu_only = {"alpha", "gate_softcap"} & set(kw)
    if set(kw) - {"limit", "alpha", "up_offset", "gate_softcap", "up_softcap"} or (
        silu_only and name != "silu"
    ):
        raise ValueError(f"bad activation argument {activation!r}")
    return name, kw


@dataclass(frozen=True)
class Specialisation:
    """What an expert kernel set is specialised to (one expert group of one spec); ``limit``,
    ``alpha``, ``up_offset``: the clamped GLU (``moespec.spec.experts.FFNSpec``)."""

    activation: str
    glu: bool
    bias: bool
    dtype: str
    limit: float | None = None
    alpha: float = 1.0
    up_offset: float = 0.0
    gate_softcap: float | None = None
    up_softcap: float | None = None

    @classmethod
    def of(cls, activation: str, glu: bool, bias: bool, dtype: str) -> Specialisation:
        """From the expert ops' ``activation`` argument (see :func:`glu_options`)."""
        name, kw = glu_options(activation)
        return cls(name, glu, bias, dtype, **kw)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"no Triton kernels for activation {self.activation!r}; have {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"no Triton kernels for dtype {self.dtype!r}; have {DTYPES}")

    kernels = EXPERT_KERNELS

    @property
    def key(self) -> str:
        """A short stable name of the specialisation (cache directory, file names)."""
        text = f"{self.activation}-{'glu' if self.glu else 'mlp'}-{'bias' if self.bias else 'nobias'}"
        clamp = "".join(
            f"-{k}{v!r}"
            for k, v, plain in (
                ("l", self.limit, None),
                ("a", self.alpha, 1.0),
                ("o", self.up_offset, 0.0),
                ("gc", self.gate_softcap, None),
                ("uc", self.up_softcap, None),
            )
            if v != plain
        )
        return f"{text}{clamp}-{self.dtype}"

    def context(self) -> dict[str, Any]:
        return {
            **asdict(self),
            # fp32 dots stay fp32 (Triton's default would be tf32): the spec's dtype is kept.
            "dot_kwargs": ', input_precision="ieee"' if self.dtype == "fp32" else "",
        }


@dataclass(frozen=True)
class RouterSpecialisation:
    """What the fused top-k router kernel is specialised to."""

    score: str  # softmax | sigmoid
    order: str  # softmax_then_topk | topk_then_softmax
    renormalize: bool
    group_score: str  # max | top2_sum (read only with groups)

    kernels = ROUTER_KERNELS

    @property
    def key(self) -> str:
        renorm = "renorm" if self.renormalize else "raw"
        return f"{self.score}-{self.order}-{renorm}-{self.group_score}"

    def context(self) -> dict[str, Any]:
        return asdict(self)


def render_kernel(
    name: str,
    spec: Specialisation | RouterSpecialisation,
    *,
    arch: str = "any",
    spec_name: str = "(runtime)",
    spec_sha256: str = "-",
) -> str:
    """The source of kernel ``name`` for ``spec``."""
    from moespec import __version__

    if name not in spec.kernels:
        raise KeyError(f"no Triton kernel template {name!r} for {type(spec).__name__}; have {spec.kernels}")
    context = {
        **spec.context(),
        "specialisation": " ".join(f"{k}={v}" for k, v in asdict(spec).items()),
        "version": __version__,
        "spec": spec_name,
        "spec_sha256": spec_sha256,
        "arch": arch,
    }
    return environment().get_template(f"triton/{name}.py.jinja").render(**context)


def render_all(spec: Specialisation | RouterSpecialisation, **header: str) -> dict[str, str]:
    """``{file name: source}`` of every kernel of ``spec`` (file names carry the key)."""
    return {f"{name}__{spec.key}.py": render_kernel(name, spec, **header) for name in spec.kernels}


def source_digest(sources: dict[str, str]) -> str:
    """A short hash of rendered sources (names the runtime cache directory)."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    return h.hexdigest()[:16]


def layer_kernels(
    ffns: list,
    dtype: str,
    router: RouterSpecialisation | None,
    *,
    arch: str,
    spec_name: str,
    spec_sha256: str,
) -> dict[str, str]:
    """``{file name: source}`` of the kernels a triton layer runs: one set per distinct
    specialisation of its FFN groups (``ffns``: IR expert groups and shared experts, each with
    ``kind``, ``activation`` and ``bias``) and the fused router when it has one, headed with
    the spec's name and hash."""
    header = {"arch": arch, "spec_name": spec_name, "spec_sha256": spec_sha256}
    out: dict[str, str] = {}
    for f in ffns:
        out |= render_all(Specialisation.of(f.activation, f.kind == "glu", f.bias, dtype), **header)
    if router is not None:
        out |= render_all(router, **header)
    return out
