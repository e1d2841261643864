"""``EPPlan``: one layer's expert parallelism on one rank, and the graph steps that use it.

Legend: T tokens on this rank, G tokens over the ``ep`` group, K slots per token, E routable
experts, D d_model, N sorted rows, R rows received, L experts held by this rank, W ranks.

A parallel layer's graph (``moespec.lower.fx.lower_layer(..., ep=True)``) routes this rank's
tokens with the replicated router, then calls these methods on ``layer._ep``:

- ``token_sizes`` (:class:`~moespec.parallel.tokens.TokenGroup`): every rank's T, when
  capacity or Soft MoE needs it before the experts (otherwise the experts' exchange carries it).
- ``capacity_keep``: the capacity decision over the concatenation of every rank's slots (the
  same C and priority order as one process running all G tokens), this rank's rows of it.
- ``experts``: rows of routed FFN experts go to the rank holding their expert
  (``all_to_all``; the row counts are all-gathered first, a host sync: the only one of a
  dropless layer), run there through
  ``moespec::expert_ffn_combine`` with their routing weights, come back, and are summed per
  token. Zero-compute and shared experts stay local (they are replicated).
- ``gather_aux`` on the layer's ``_stats`` group (this plan, or every rank of the mesh for
  ``scope: global``): losses and statistics over every rank's tokens.

Experts held by a rank (its *local space*) are its experts in ascending global index; group g's
local experts start at ``local_first[g]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import moespec.ops  # noqa: F401  (registers torch.ops.moespec.*)
from moespec.ir.nodes import MoELayerNode
from moespec.parallel.comm import all_to_all, exchange_sizes, gather_tokens
from moespec.parallel.tokens import TokenGroup

OPS = torch.ops.moespec


@dataclass
class EPPlan(TokenGroup):
    """Where every routed FFN expert lives, and this rank's share (and, as a
    :class:`TokenGroup`, the ``ep`` group's token steps)."""

    owner_E: Tensor  # [n_ffn] rank of each routed FFN expert
    owners: tuple[int, ...]  # the same, as host ints
    mine: tuple[int, ...]  # the experts this rank holds (its local space, in order)
    local_rows: tuple[Tensor, ...]  # per expert group: this rank's experts, indices within the group
    local_first: tuple[int, ...]  # per expert group: first local index of its experts here
    n_local: int
    n_ffn: int
    group_first: tuple[int, ...]  # per expert group: its first global expert index
    group_count: tuple[int, ...]  # per expert group: its experts
    expert_op: str = "expert_ffn_combine"  # the backend's op (``triton_expert_ffn_combine``)
    # Benchmarks only: seconds spent per phase of `experts` in forward ("all-to-all",
    # "experts", "dispatch+combine"), accumulated while set to a dict.
    clock: dict[str, float] | None = None

    @classmethod
    def make(cls, ir: MoELayerNode, group: dist.ProcessGroup) -> EPPlan:
        """The plan of ``ir``'s ``placement`` on this rank of ``group``."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        owner = list(ir.placement.expert_to_rank)
        rows, firsts, n = [], [], 0
        for grp in ir.experts.groups:
            mine = [i for i in range(grp.count) if owner[grp.first + i] == rank]
            rows.append(torch.tensor(mine, dtype=torch.int64))
            firsts.append(n)
            n += len(mine)
        return cls(
            group=group,
            rank=rank,
            world=world,
            owner_E=torch.tensor(owner, dtype=torch.int64),
            owners=tuple(owner),
            mine=tuple(e for e, r in enumerate(owner) if r == rank),
            local_rows=tuple(rows),
            local_first=tuple(firsts),
            n_local=n,
            n_ffn=len(owner),
            group_first=tuple(g.first for g in ir.experts.groups),
            group_count=tuple(g.count for g in ir.experts.groups),
            expert_op=("triton_" if ir.backend == "triton" else "") + "expert_ffn_combine",
        )

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        if self.clock is None:
            yield
            return
        # Benchmarks only: on a GPU, queued kernels must finish inside the phase they belong to.
        sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.clock[name] = self.clock.get(name, 0.0) + time.perf_counter() - start

    # --- graph steps ---------------------------------------------------------------------

    def capacity_keep(
        self,
        sizes: list[int],
        idx_TK: Tensor,
        weight_TK: Tensor,
        active_TK: Tensor,
        u_TK: Tensor,
        n_experts: int,
        factor: float,
        min_capacity: int,
        policy: str,
    ) -> Tensor:
        """``moespec::capacity_keep`` over every rank's slots (C from G tokens), this rank's rows."""
        g = lambda t: gather_tokens(t.detach(), sizes, self.rank, self.group)  # noqa: E731
        u = g(u_TK) if u_TK.numel() else u_TK
        keep_GK = OPS.capacity_keep(
            g(idx_TK), g(weight_TK), g(active_TK), u, n_experts, factor, min_capacity, policy
        )
        start = sum(sizes[: self.rank])
        return keep_GK[start : start + idx_TK.shape[0]]

    def experts(
        self,
        x_TD: Tensor,
        token_idx_N: Tensor,
        row_w_N: Tensor,
        offsets_E1: Tensor,
        group_args: tuple[tuple, ...],
        sizes: list[int] | None,
    ) -> tuple[Tensor, list[int]]:
        """``(y_TD, sizes)``: y_TD[t] = Σ over t's rows n on routed FFN experts of row_w[n] ·
        FFN_{e(n)}(x[t]), each FFN run on the rank holding it. ``group_args[g]``: group g's
        weights (global DTensors or this rank's local tensors) and activation, in
        ``ExpertWeights`` order. ``sizes``: every rank's T, exchanged here with the row
        counts when None (one host sync for the whole layer when dropless)."""
        dev = x_TD.device
        with self._phase("dispatch+combine"):
            counts_E = (offsets_E1[1 : self.n_ffn + 1] - offsets_E1[: self.n_ffn]).to(dev)
            owner_E = self.owner_E.to(dev)
            t_1 = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=dev)
        with self._phase("all-to-all"):
            # Every rank's rows per expert (host sync): the split sizes, and each received
            # row's expert without sending it (a source sends its rows in expert order).
            rows_WE = exchange_sizes(torch.cat([counts_E, t_1]) if sizes is None else counts_E, self.group)
        if sizes is None:
            sizes = [row[-1] for row in rows_WE]
        counts_WE = [row[: self.n_ffn] for row in rows_WE]
        mine, send = self.mine, [0] * self.world
        for e, c in enumerate(counts_WE[self.rank]):
            send[self.owners[e]] += c
        recv = [sum(row[e] for e in mine) for row in counts_WE]
        n_rows = sum(send)
        with self._phase("dispatch+combine"):
            expert_N = torch.repeat_interleave(
                torch.arange(self.n_ffn, device=dev), counts_E, output_size=n_rows
            )
            # Rows are sorted by expert; the exchange wants them grouped by destination rank.
            by_rank_N = torch.argsort(owner_E[expert_N], stable=True)
            token_S = token_idx_N[:n_rows][by_rank_N]
            x_S, w_S = x_TD.index_select(0, token_S), row_w_N[:n_rows][by_rank_N]
            from_JL = torch.tensor(
                [[row[e] for e in mine] for row in counts_WE], dtype=torch.int64, device=dev
            )
            local_R = torch.repeat_interleave(
                torch.arange(len(mine), device=dev).repeat(self.world),
                from_JL.flatten(),
                output_size=sum(recv),
            )
        with self._phase("all-to-all"):
            if w_S.dtype == x_S.dtype:  # one exchange: the weight rides as a last column
                xw_R = all_to_all(torch.cat([x_S, w_S.unsqueeze(1)], 1), send, recv, self.group)
                x_R, w_R = xw_R[:, :-1], xw_R[:, -1]
            else:
                x_R = all_to_all(x_S, send, recv, self.group)
                w_R = all_to_all(w_S, send, recv, self.group)
        with self._phase("experts"):
            # Received rows sorted by local expert; row r is its own "token" in the combine op,
            # so y_R[r] = w_R[r] · FFN(x_R[r]) in receive order.
            order_R = torch.argsort(local_R, stable=True)
            offsets_L1 = torch.zeros(self.n_local + 1, dtype=torch.int64, device=dev)
            offsets_L1[1:] = torch.cumsum(torch.bincount(local_R, minlength=self.n_local), 0)
            y_R, op = x_R.new_zeros(x_R.shape), getattr(OPS, self.expert_op)
            for rows, first, args in zip(self.local_rows, self.local_first, group_args, strict=True):
                if rows.numel() == 0:
                    continue
                local = tuple(_local(a) for a in args)
                y_R = y_R + op(x_R, order_R, w_R[order_R], offsets_L1, first, *local)[0]
        with self._phase("all-to-all"):
            y_S = all_to_all(y_R, recv, send, self.group)
        with self._phase("dispatch+combine"):
            return x_TD.new_zeros(x_TD.shape).index_add(0, token_S, y_S), sizes


def _local(arg: object) -> object:
    """A DTensor parameter's local shard (differentiable); anything else unchanged."""
    to_local = getattr(arg, "to_local", None)
    return to_local() if to_local is not None else arg
