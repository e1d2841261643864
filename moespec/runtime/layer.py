"""``MoELayer``: the nn.Module training code gets from ``moespec.build``.

Legend: T tokens, D d_model, E experts, K top-k.

The module owns the parameters under clean, stable names (the checkpoint contract; see
``moespec.ir.params``) and runs one of two FX GraphModules lowered from the IR:
the training graph (jitter, noise, train capacity) or the eval graph. Random draws happen
here, from ``self.generator`` (or the global RNG when it is None), in the reference's order,
and enter the graph as inputs, so the graph itself is pure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from moespec.common.dtypes import TORCH_DTYPES
from moespec.common.params import init_params, meta_params
from moespec.common.rng import gumbel, normal, uniform
from moespec.ir.nodes import MoELayerNode
from moespec.lower.aux import AuxLossAndStats
from moespec.lower.fx import OUTPUTS, extra_inputs, lower_layer, random_inputs
from moespec.lower.routers import lowering
from moespec.runtime.replay import after_call, routing_inputs
from moespec.runtime.schedules import evaluate
from moespec.runtime.target import check_expert_parallel

# Generated forward functions, shared by every layer whose graph prints the same code. Each
# GraphModule has its own class, so calling GraphModules would make torch.compile recompile
# per layer; one function per distinct graph lets identical layers share a compilation.
_FORWARDS: dict[str, Callable[..., tuple[Tensor, ...]]] = {}


def _shared_forward(gm: fx.GraphModule) -> Callable[..., tuple[Tensor, ...]]:
    # The code only reads self.router / self.experts / self.shared / self.zero_compute /
    # self.aux, which the MoELayer (the graph's root) owns under the same names.
    return _FORWARDS.setdefault(gm.code, type(gm).forward)


def _set(root: nn.Module, dotted: str, value: Tensor, buffer: bool) -> None:
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if buffer:
        mod.register_buffer(leaf, value)
    else:
        mod.register_parameter(leaf, nn.Parameter(value))


class MoELayer(nn.Module):
    """One MoE layer built from a spec. ``forward(x)`` takes [..., d_model] and returns the
    same shape. After each call ``aux_loss`` holds the weighted auxiliary loss (a scalar with
    gradient), ``router_logits`` the [T, E] router logits (before noise, in the router dtype)
    and ``routing_stats`` a dict of tensors (no host sync): ``routed_per_expert``,
    ``tokens_per_expert`` (after capacity), ``dropped_fraction``, ``router_entropy``,
    ``load_ratio`` (max/min routed load). In eval mode the loss and the statistics are
    computed when first read (the aux-loss work is skipped for calls nobody reads it from),
    except under expert parallelism or ``scope: global``, where computing them is a
    collective."""

    def __init__(
        self, ir: MoELayerNode, *, seed: int = 0, generator: torch.Generator | None = None, meta: bool = False
    ) -> None:
        """The layer the IR describes, with fresh weights drawn from ``seed``; ``generator``
        drives jitter, noise and random policies (the global RNG when None). ``meta``: the
        weights stay on the ``meta`` device (shapes only; the artifact writer then draws and
        writes them one at a time, ``moespec build --meta``); such a layer cannot run."""
        super().__init__()
        self.d_model, self.dtype = ir.d_model, TORCH_DTYPES[ir.dtype]
        self.generator = generator
        init_gen = torch.Generator().manual_seed(seed)
        params = (
            meta_params(ir.params, dtype=self.dtype)
            if meta
            else init_params(ir.params, generator=init_gen, dtype=self.dtype)
        )
        for p in ir.params:
            _set(self, p.name, params[p.name], buffer=p.buffer)
        object.__setattr__(self, "_controllers", tuple(p.name for p in ir.params if p.controller))
        self.aux = AuxLossAndStats(
            ir.losses, ir.router.score, ir.experts.n_experts, ir.router.nominal_k, ir.experts.sizes
        )
        object.__setattr__(self, "ir", ir)
        if ir.schedules:
            # The step counter is state: checkpoints resume schedules where they were.
            self.schedule = nn.Module()
            self.schedule.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._lower()
        self.aux_loss = None
        self.router_logits: Tensor | None = None
        self.routing_stats = {}

    # aux_loss and routing_stats: set by a training call, or computed from an eval call's
    # pending inputs when first read.
    @property
    def aux_loss(self) -> Tensor | None:
        """The last call's weighted auxiliary loss (see the class docstring)."""
        self._resolve_aux()
        return self.__dict__["_aux_loss"]

    @aux_loss.setter
    def aux_loss(self, value: Tensor | None) -> None:
        self.__dict__.update(_aux_loss=value, _pending_aux=None)

    @property
    def routing_stats(self) -> dict[str, Tensor]:
        """The last call's routing statistics (see the class docstring)."""
        self._resolve_aux()
        return self.__dict__["_routing_stats"]

    @routing_stats.setter
    def routing_stats(self, value: dict[str, Tensor]) -> None:
        self.__dict__.update(_routing_stats=value, _pending_aux=None)

    def _resolve_aux(self) -> None:
        pending = self.__dict__.get("_pending_aux")
        if pending is not None:
            # As if computed in the call: an eval call in its grad mode, not the reader's (a
            # no_grad log read must not strip the loss of its gradient, nor a later .train()
            # add training-only terms).
            args, kwargs, grad = pending
            was_training, self.aux.training = self.aux.training, False
            try:
                with torch.set_grad_enabled(grad):
                    aux, *stats = self.aux(*args, **kwargs)
            finally:
                self.aux.training = was_training
            self.__dict__.update(
                _aux_loss=aux, _routing_stats=dict(zip(OUTPUTS[3:], stats, strict=True)), _pending_aux=None
            )

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # `.to(dtype)` / `.half()` cast every floating buffer; a running controller's state
        # (the expert bias, ReMoE's λ) stays fp32, since its small steps vanish in bf16. It is
        # restored from the tensor before the cast (casting back after would keep the rounding).
        before = {name: self.get_buffer(name) for name in self._controllers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            mod_name, _, leaf = name.rpartition(".")
            mod = self.get_submodule(mod_name)
            new = mod._buffers[leaf]
            if new is not None and new.dtype != torch.float32:
                mod._buffers[leaf] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _lower(self) -> None:
        # The IR and graphs are not submodules: parameters must appear once in state_dict.
        # An expert-parallel layer (moespec.parallelize) holds its plan as `_ep`.
        ep = hasattr(self, "_ep")
        # A `scope: global` layer on a mesh wider than `ep` holds its token group as `_stats`.
        stats = hasattr(self, "_stats")
        graphs = {t: lower_layer(self.ir, self, training=t, ep=ep, stats=stats) for t in (True, False)}
        object.__setattr__(self, "_graphs", graphs)
        object.__setattr__(self, "_forwards", {t: _shared_forward(gm) for t, gm in graphs.items()})
        # Per mode, the keyword names of an eval graph's pending aux inputs (None: eager aux).
        # A plain value, equal across layers of one spec: compiled layers share one guard.
        object.__setattr__(self, "_lazy_aux", {t: getattr(gm, "lazy_aux", None) for t, gm in graphs.items()})

    def __getstate__(self) -> dict:
        # Pickle / deepcopy: generated graph code is rebuilt on load, and the last call's
        # outputs (still attached to an autograd graph) are not part of the layer's state.
        state = self.__dict__.copy()
        for key in ("_graphs", "_forwards", "_lazy_aux", "_routing_tap"):
            state.pop(key, None)
        state.update(_aux_loss=None, router_logits=None, _routing_stats={}, _pending_aux=None)
        # A copy is not part of a recording or replay (those belong to the original).
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lower()

    @property
    def experts_dtype(self) -> torch.dtype:
        """The dtype of the layer's parameters (its first expert weight; routers such as hash
        routing have no floating parameter of their own)."""
        return self.experts.get_submodule("0").w_up.dtype

    @property
    def graph_module(self) -> fx.GraphModule:
        """The GraphModule the current mode runs (training or eval)."""
        return self._graphs[self.training]

    def _check(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"moespec layer expects input of shape [..., {self.d_model}], got {tuple(x.shape)}"
            )
        # The parameters' dtype is the truth: `layer.to(torch.bfloat16)` changes it.
        expected = self.experts_dtype
        if x.dtype != expected:
            raise TypeError(
                f"moespec layer was built for dtype {expected} (its parameters' dtype: target.dtype or a "
                f"later .to()); got {x.dtype}. Cast the input or the layer."
            )

    def _draw(self, x_TD: Tensor) -> list[Tensor]:
        """The random graph inputs, in the reference's order and fp32.

        With ``self.generator`` the draws are bit-identical to the reference's for the same
        seed (eager only: torch.compile cannot trace a Generator object). Without one they
        come from the global RNG, which torch.compile traces (fullgraph) and
        ``torch.manual_seed`` makes deterministic.
        """
        # Multi-head MoE draws per sub-token: T·h rows of width D/h.
        t, d = x_TD.shape[0] * self.ir.heads, x_TD.shape[1] // self.ir.heads
        dims = {"T": t, "D": d, "E": self.ir.experts.n_experts, "K": self.ir.dispatch.rows_per_token}
        gen, f32 = self.generator, x_TD.new_empty(0, dtype=torch.float32)
        draws = []
        for ri in random_inputs(self.ir, self.training):
            shape = tuple(dims[c] for c in ri.shape)
            if gen is not None:
                flat = (shape[0] * shape[1],) if ri.shape == "TK" else shape  # reference draws TK flat
                sample = {"uniform": uniform, "normal": normal, "gumbel": gumbel}[ri.dist](flat, gen, f32)
                draws.append(sample.reshape(shape))
            elif ri.dist == "normal":
                draws.append(torch.randn(shape, device=x_TD.device))
            else:
                u = torch.rand(shape, device=x_TD.device)
                if ri.dist == "gumbel":
                    u = -torch.log(
                        -torch.log(u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps))
                    )
                draws.append(u)
        return draws

    def _extra(self, x: Tensor, given: dict[str, Tensor | None]) -> list[Tensor]:
        """The router's extra inputs (e.g. ``input_ids``), each as [T, *trailing]."""
        specs = extra_inputs(self.ir)
        names = [e.name for e in specs]
        unknown = sorted(k for k in given if k not in names)
        if unknown:
            raise TypeError(
                f"moespec layer {self.ir.name!r} ({self.ir.router.kind} router) takes no input "
                f"{unknown[0]!r}; its extra inputs: {names or 'none'}"
            )
        lead, n_tok = tuple(x.shape[:-1]), x.numel() // x.shape[-1]
        out = []
        for e in specs:
            t = given.get(e.name)
            if t is None and e.optional:
                t = x.new_zeros((n_tok, *e.trailing))
            if t is None:
                raise TypeError(
                    f"moespec layer {self.ir.name!r} ({self.ir.router.kind} router) needs `{e.name}` "
                    f"of shape {lead + e.trailing}: call layer(x, {e.name}=...)"
                )
            shapes = {lead + e.trailing, (n_tok, *e.trailing)}
            if tuple(t.shape) not in shapes:
                extra = f" + {e.trailing}" if e.trailing else ""
                raise ValueError(
                    f"`{e.name}` must have shape {lead + e.trailing} (x without its last dim{extra}) "
                    f"or {(n_tok, *e.trailing)}, got {tuple(t.shape)}"
                )
            if e.dtype == "float":
                if not t.is_floating_point():
                    raise TypeError(f"`{e.name}` must be a floating-point tensor, got {t.dtype}")
            elif t.is_floating_point() or t.is_complex():
                raise TypeError(f"`{e.name}` must be an integer tensor, got {t.dtype}")
            out.append(t.reshape(n_tok, *e.trailing))
        return out

    def set_step(self, step: int) -> None:
        """Set the training step the schedules are evaluated at (no recompilation)."""
        if not self.ir.schedules:
            raise ValueError(f"moespec layer {self.ir.name!r} has no schedules")
        self.schedule.step.fill_(int(step))

    def schedule_values(self) -> dict[str, Tensor]:
        """The scheduled fields' current values (0-dim tensors; ints for router.k)."""
        step = self.schedule.step if self.ir.schedules else None
        fields = self.ir.router.config.schedulable()
        return {
            s.param: evaluate(s, step, integer=fields[s.param.removeprefix("router.")] is int)
            for s in self.ir.schedules
        }

    def forward(self, x: Tensor, **inputs: Tensor | None) -> Tensor:
        """y = MoE(x) for x of shape [..., d_model]; a 3-D x is [batch, seq, d_model].
        Routers that read more than x (hash routing: ``input_ids``) take it by keyword."""
        check_expert_parallel(self)
        self._check(x)
        x_TD = x.reshape(-1, self.d_model)
        extra = self._extra(x, inputs)
        seq_len = x.shape[1] if x.dim() == 3 else 0
        fwd = self._forwards[self.training]
        sched = [v.to(x.device) for v in self.schedule_values().values()]
        replay = routing_inputs(self, x_TD) if lowering(self.ir).replay else []
        outs = fwd(self, x_TD, *extra, *replay, *sched, *self._draw(x_TD), seq_len)
        y_TD, logits_TE, *rest, idx_TK, weight_TK = outs
        after_call(self, idx_TK, weight_TK)
        self.router_logits = logits_TE
        lazy = self._lazy_aux[self.training]
        if lazy is not None:  # eval: the aux module runs when aux_loss / routing_stats are read
            n_pos = len(rest) - len(lazy)
            kwargs = dict(zip(lazy, rest[n_pos:], strict=True))
            self.__dict__["_pending_aux"] = (tuple(rest[:n_pos]), kwargs, torch.is_grad_enabled())
        else:
            self.aux_loss, *stats = rest
            self.routing_stats = dict(zip(OUTPUTS[3:], stats, strict=True))
        if self.training:
            with torch.no_grad():
                lowering(self.ir).after_forward(self, self.routing_stats)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"name={self.ir.name!r}, d_model={self.d_model}, experts={self.ir.experts.n_experts}"
