"""Expert declarations: routed FFN groups, shared experts and zero-compute experts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moespec.spec.base import Strict

Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]


class InitSpec(Strict):
    """How expert weights are initialised."""

    kind: Literal["normal", "trunc_normal", "uniform_fan_in"] = Field(
        "normal",
        description="`normal`: N(0, std²); `trunc_normal`: N(0, std²) cut at ±2·std; "
        "`uniform_fan_in`: U(±1/sqrt(fan_in)) as torch.nn.Linear does.",
    )
    std: float = Field(0.02, gt=0, description="Standard deviation for the normal kinds.")
    output_scale: float = Field(
        1.0, gt=0, description="Extra factor on the std of the down (output) projection."
    )


class FFNSpec(Strict):
    """One feed-forward block: `mlp` is act(x W_up) W_down, `glu` is (act(x W_gate) * x W_up) W_down.

    The gated forms of each activation are `kind: glu` with that activation: silu -> SwiGLU,
    gelu -> GeGLU, gelu_tanh -> GeGLU (tanh approximation), relu -> ReGLU.

    The clamped SwiGLU of GPT-OSS (and DeepSeek-V4, GLM-5, Step-3.7, ...) is `glu` with
    `limit`, `alpha` and `up_offset`: with g = min(gate, limit), u = clamp(up, -limit, limit),
    the product is act_alpha(g) * (u + up_offset), where act_alpha(g) = g * sigmoid(alpha * g)
    for silu (GPT-OSS: limit 7, alpha 1.702, up_offset 1). The softcapped SwiGLU (Inkling-2)
    bounds SiLU's linear factor and up smoothly: with cap(v, c) = c * tanh(v / c),
    act(g) = cap(g, gate_softcap) * sigmoid(alpha * g) and u = cap(u, up_softcap).
    """

    kind: Literal["mlp", "glu"] = Field(description="`mlp` (two matrices) or `glu` (three, gated).")
    activation: Activation = Field(description="Activation function (the gate's, for `glu`).")
    d_ff: int = Field(gt=0, description="Hidden width of the block.")
    bias: bool = Field(False, description="Whether the projections carry biases.")
    init: InitSpec = Field(default_factory=InitSpec, description="Weight initialisation.")
    limit: float | None = Field(
        None,
        gt=0,
        description="`glu` only: clamp the gate projection to at most `limit` and the up projection "
        "to [-limit, limit] before the product (GPT-OSS's and DeepSeek-V4's `swiglu_limit`). "
        "Unset: no clamp.",
    )
    alpha: float = Field(
        1.0,
        gt=0,
        description="`glu` with `silu` only: the gate's activation is g * sigmoid(alpha * g) "
        "(GPT-OSS's `swiglu_alpha`, 1.702); 1 is plain SiLU.",
    )
    up_offset: float = Field(
        0.0,
        description="`glu` only: the gate's activation multiplies (up + up_offset) instead of up "
        "(GPT-OSS: 1).",
    )

    gate_softcap: float | None = Field(
        None,
        gt=0,
        description="`glu` with `silu` only: SiLU's linear factor becomes c * tanh(g / c) with c = "
        "`gate_softcap` (the sigmoid still sees g; Inkling-2's `mlp_gate_softcap`). Unset: g.",
    )
    up_softcap: float | None = Field(
        None,
        gt=0,
        description="`glu` only: the up projection becomes c * tanh(up / c) with c = `up_softcap` "
        "(Inkling-2's `mlp_up_softcap`). Unset: up.",
    )

    @property
    def glu_options(self) -> dict[str, float]:
        """The clamped-GLU options that differ from the plain form (empty for a plain block)."""
        opts = {
            "limit": self.limit, "alpha": self.alpha, "up_offset": self.up_offset,
            "gate_softcap": self.gate_softcap, "up_softcap": self.up_softcap,
        }  # fmt: skip
        plain = {"limit": None, "alpha": 1.0, "up_offset": 0.0, "gate_softcap": None, "up_softcap": None}
        return {k: v for k, v in opts.items() if v != plain[k]}

    @property
    def op_activation(self) -> str:
        """The expert ops' ``activation`` argument: the activation's name, followed by the
        clamped-GLU options as ``;name=value`` (``silu;limit=7.0;alpha=1.702;up_offset=1.0``;
        ``moespec.ops.activations.parse`` reads it back)."""
        return "".join([self.activation, *(f";{k}={v!r}" for k, v in self.glu_options.items())])


class RoutedExpertGroup(FFNSpec):
    """`count` routed experts with the same shape; several groups make a heterogeneous layer."""

    count: int = Field(gt=0, description="Number of experts in this group.")
    granularity: int = Field(
        1,
        ge=1,
        description="Fine-grained segmentation factor m (DeepSeekMoE): the group is materialised "
        "as count*m experts of width d_ff/m. The router's k counts materialised experts.",
    )

    @property
    def n_experts(self) -> int:
        """Experts after fine-grained segmentation."""
        return self.count * self.granularity

    @property
    def width(self) -> int:
        """Hidden width of each materialised expert."""
        return self.d_ff // self.granularity


class SharedExperts(FFNSpec):
    """Always-on experts added to every token's output (DeepSeekMoE, Qwen-MoE)."""

    count: int = Field(1, gt=0, description="Number of shared experts, each of width d_ff.")
    gate: bool = Field(
        False,
        description="Scale the shared output by sigmoid(x w_gate) with a learned d_model vector "
        "(Qwen-MoE's shared_expert_gate).",
    )


class ZeroComputeExperts(Strict):
    """MoE++ zero-computation experts that take routing slots but no FFN.

    `zero`: f(x) = 0; `copy`: f(x) = x; `constant`: f(x) = a1·x + a2·v with [a1, a2] =
    softmax(x W_c) and a learned vector v.
    """

    kind: Literal["zero", "copy", "constant"] = Field(description="Which zero-compute expert.")
    count: int = Field(1, gt=0, description="How many of them.")


class ExpertsSpec(Strict):
    """All experts of a layer. Routed expert indices follow `routed` order, then `zero_compute`."""

    routed: list[RoutedExpertGroup] = Field(
        min_length=1,
        description="Groups of routed FFN experts; more than one group gives heterogeneous experts.",
    )
    shared: SharedExperts | None = Field(None, description="Always-on shared experts, if any.")
    zero_compute: list[ZeroComputeExperts] = Field(
        default_factory=list, description="MoE++ zero/copy/constant experts, routed like the others."
    )

    @property
    def n_ffn(self) -> int:
        """Routed FFN experts (after fine-grained segmentation)."""
        return sum(g.n_experts for g in self.routed)

    @property
    def n_routed(self) -> int:
        """Every routable expert, zero-compute ones included."""
        return self.n_ffn + sum(z.count for z in self.zero_compute)
