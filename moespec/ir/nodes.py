"""The frozen, fully resolved IR: Program -> MoELayer -> Router / Dispatch / Experts / Combine
(and, with a `model:` section, Program -> ModelNode: the network around the layers).

The IR is what lowering consumes. Unlike the spec it has no defaults left to resolve: every
dtype is concrete, expert indices are assigned, the expert-to-rank map is explicit. Router,
capacity and loss options stay as their (frozen) spec objects, so a new router kind needs no
new IR node. Each node carries ``origin``, the spec path it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from moespec.ir.model_numbers import ModelNumbers
from moespec.ir.numbers import LayerNumbers
from moespec.ir.params import ParamNode
from moespec.spec.base import Strict
from moespec.spec.experts import InitSpec
from moespec.spec.routers.base import ExtraInput


@dataclass(frozen=True)
class RouterNode:
    """Scores and selection. ``config`` is the router's spec model (its ``kind`` picks the
    lowering); the rest is its contract resolved for this layer: ``dtype`` the router compute
    dtype (its own ``dtype`` or ``target.router_dtype``), ``score`` the score function the
    balance losses and the entropy read, ``nominal_k`` the k the balance losses normalise a
    dense-form routing by (None: the token-choice K), ``extra_inputs`` the per-token inputs
    the layer takes besides x, ``causal`` False when a token's routing depends on later
    tokens."""

    config: Strict
    d_model: int
    n_experts: int
    dtype: str
    origin: str
    score: str = "softmax"
    nominal_k: int | None = None
    extra_inputs: tuple[ExtraInput, ...] = ()
    causal: bool = True

    @property
    def kind(self) -> str:
        """The router kind, e.g. ``topk``."""
        return self.config.kind  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DispatchNode:
    """Sort (token, expert) pairs by expert; apply capacity. At most ``rows_per_token``·T rows:
    the static bound on a token's (token, expert) rows, which is the router's k for top-k
    (``RouterSpec.rows_per_token``); ``capacity`` is the spec's capacity section (its
    ``train_factor`` / ``eval_factor`` pick C per mode, ``moespec.common.capacity``)."""

    n_experts: int
    rows_per_token: int
    capacity: Strict
    origin: str


@dataclass(frozen=True)
class ExpertGroupNode:
    """``count`` routed FFN experts with indices ``first .. first+count-1``."""

    kind: str
    activation: str  # the ops' form: name and clamped-GLU options (FFNSpec.op_activation)
    width: int
    count: int
    bias: bool
    init: InitSpec
    first: int


@dataclass(frozen=True)
class ZeroComputeNode:
    """``count`` zero/copy/constant experts with indices ``first .. first+count-1``."""

    kind: str
    count: int
    first: int


@dataclass(frozen=True)
class ExpertsNode:
    """All routed experts: FFN groups first, then zero-compute experts."""

    d_model: int
    groups: tuple[ExpertGroupNode, ...]
    zero_compute: tuple[ZeroComputeNode, ...]
    origin: str
    sizes: tuple[int, ...] = ()  # parameters of each routed expert (the parameter penalty's weights)

    @property
    def n_ffn(self) -> int:
        """Routed FFN experts."""
        return sum(g.count for g in self.groups)

    @property
    def n_experts(self) -> int:
        """Every routable expert."""
        return self.n_ffn + sum(z.count for z in self.zero_compute)

    @property
    def homogeneous(self) -> bool:
        """True when one grouped GEMM covers every FFN expert."""
        return len(self.groups) == 1


@dataclass(frozen=True)
class SharedNode:
    """Always-on experts; ``count`` experts of width w are one FFN of width count·w."""

    kind: str
    activation: str
    width: int
    bias: bool
    gate: bool
    init: InitSpec
    origin: str


@dataclass(frozen=True)
class CombineNode:
    """y_t = sum of weight · expert output over the token's kept selections (+ shared)."""

    origin: str


@dataclass(frozen=True)
class LossesNode:
    """Auxiliary losses (spec objects, or None)."""

    load_balance: Strict | None
    z_loss: Strict | None
    origin: str


@dataclass(frozen=True)
class PlacementNode:
    """Expert parallelism with an explicit rank per routed FFN expert."""

    expert_parallel: int
    expert_to_rank: tuple[int, ...]
    origin: str


@dataclass(frozen=True)
class MoELayerNode:
    """One MoE layer (``count`` identical copies of it in the model). ``params`` is its
    state table (names, shapes, init; :mod:`moespec.ir.params`): ``MoELayer(ir)`` needs
    nothing else."""

    name: str
    count: int
    d_model: int
    dtype: str
    router: RouterNode
    dispatch: DispatchNode
    experts: ExpertsNode
    shared: SharedNode | None
    combine: CombineNode
    losses: LossesNode
    placement: PlacementNode
    numbers: LayerNumbers
    params: tuple[ParamNode, ...] = ()
    schedules: tuple[Strict, ...] = ()
    heads: int = 1
    head_bias: bool = False
    # target.backend: which kernels run the experts (``torch`` ops or generated ``triton`` ones).
    backend: str = "torch"

    @property
    def inner_d_model(self) -> int:
        """Width of the router and experts: d_model / heads (multi-head MoE) or d_model."""
        return self.d_model // self.heads


@dataclass(frozen=True)
class AttentionNode:
    """Self-attention of every block, resolved: ``kv_heads`` and ``head_dim`` concrete,
    ``causal`` from the model kind."""

    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    qk_norm: str
    bias: bool
    causal: bool


@dataclass(frozen=True)
class DenseFFNNode:
    """The FFN of a dense block."""

    kind: str
    activation: str
    d_ff: int
    bias: bool


@dataclass(frozen=True)
class ModelNode:
    """The network of a `model:` section: ``blocks`` holds, per block, the name of its MoE
    layer design (one of the program's layers) or None for a dense block (``dense_ffn``)."""

    kind: str
    d_model: int
    vocab_size: int
    pad_token_id: int | None
    max_seq_len: int
    attention: AttentionNode
    norm: str
    norm_eps: float
    dense_ffn: DenseFFNNode | None
    blocks: tuple[str | None, ...]
    tie_embeddings: bool
    pool: str
    classes: int | None
    init_std: float
    numbers: ModelNumbers
    origin: str = "model"


@dataclass(frozen=True)
class Program:
    """A whole spec after resolution."""

    name: str
    spec_hash: str
    d_model: int
    dtype: str
    device: str
    backend: str
    layers: tuple[MoELayerNode, ...]
    arch: str = "auto"
    model: ModelNode | None = None  # the network, with a `model:` section
