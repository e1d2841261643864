"""``moespec bench SPEC --nproc N``: a layer expert-parallel over N local processes: CPU
processes over gloo, or (``device="cuda"``) one GPU per process over NCCL.

Each rank builds the spec with ``placement.expert_parallel: N`` (same seed), is made
expert-parallel over a 1-D ``ep`` mesh and runs ``tokens`` random tokens of its own. A timed
step starts after a barrier and lasts until the slowest rank is done (the step time of the
group). Forward runs in eval mode under ``torch.no_grad``; forward+backward runs in training
mode on ``y.sum() + aux_loss`` plus :func:`moespec.parallel.reduce_gradients`. The forward is
split into the expert-parallel phases the plan clocks (all-to-all, experts, local
dispatch+combine work) and the rest (routing, capacity, losses and statistics), as medians
over steps of the slowest rank's time per phase. ``N = 1`` runs the plain layer in one
process (no expert parallelism): the baseline.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("routing+rest", "dispatch+combine", "all-to-all", "experts")


@dataclass(frozen=True)
class EPBenchResult:
    """What ``moespec bench --nproc`` prints (``--json`` is ``asdict`` of this)."""

    spec_name: str
    device: str
    nproc: int
    threads_per_rank: int
    tokens_per_rank: int
    repeat: int
    forward_s: float
    forward_backward_s: float
    tokens_per_s_forward: float
    tokens_per_s_forward_backward: float
    forward_phases_s: dict[str, float]

    def to_json(self) -> dict[str, object]:
        """Plain dict for ``--json`` output."""
        return asdict(self)


def bench_expert_parallel(
    spec: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    nproc: int,
    layer: str | None = None,
    tokens: int = 256,
    repeat: int = 5,
    warmup: int = 1,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
) -> EPBenchResult:
    """Run the benchmark of the module docstring in ``nproc`` spawned processes; ``device``
    ``cuda`` puts rank r on ``cuda:r`` and communicates over NCCL."""
    import torch.multiprocessing as mp

    if nproc < 1 or tokens < 1 or repeat < 1 or warmup < 0:
        raise ValueError("bench --nproc needs nproc, tokens and repeat >= 1 and warmup >= 0")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"bench --nproc runs on 'cpu' (gloo) or 'cuda' (NCCL), not {device!r}")
    if device == "cuda" and torch.cuda.device_count() < nproc:
        seen = torch.cuda.device_count()
        raise ValueError(f"--nproc {nproc} --device cuda needs {nproc} GPUs; {seen} GPU(s) visible")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        run = (str(spec), list(overrides), layer, tokens, repeat, warmup, seed, threads, device, str(out))
        args = (nproc, _free_port(), *run)
        mp.spawn(_rank_main, args=args, nprocs=nproc)
        return EPBenchResult(**json.loads(out.read_text()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(x: torch.Tensor) -> None:
    """Wait for queued GPU work before a clock is read (no-op on the CPU)."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _slowest(seconds: float) -> float:
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _rank_main(rank: int, nproc: int, port: int, spec: str, overrides: list[str], name: str | None,
               tokens: int, repeat: int, warmup: int, seed: int, threads: int, device: str,
               out: str) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=nproc)
    try:
        import moespec
        from moespec.spec.load import load_spec

        ep = [f"placement.expert_parallel={nproc}"] if nproc > 1 else []
        loaded = load_spec(spec, [*overrides, *ep])
        where = f"cuda:{rank}" if device == "cuda" else "cpu"
        layer = moespec.build(loaded, layer=name, seed=seed, device=where)
        plan = None
        if nproc > 1:
            from torch.distributed.device_mesh import init_device_mesh

            moespec.parallelize(layer, init_device_mesh(device, (nproc,), mesh_dim_names=("ep",)))
            plan = layer._ep
        gen = torch.Generator().manual_seed(seed + rank)
        x = torch.randn(tokens, layer.d_model, generator=gen).to(where, layer.experts_dtype)
        fwd, phases = _time_forward(layer, plan, x, warmup, repeat)
        train = _time_train(layer, x, warmup, repeat)
        if rank == 0:
            total = tokens * nproc
            result = EPBenchResult(
                spec_name=loaded.spec.name,
                device=device,
                nproc=nproc,
                threads_per_rank=threads,
                tokens_per_rank=tokens,
                repeat=repeat,
                forward_s=fwd,
                forward_backward_s=train,
                tokens_per_s_forward=total / fwd,
                tokens_per_s_forward_backward=total / train,
                forward_phases_s=phases,
            )
            Path(out).write_text(json.dumps(result.to_json()))
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_rank()


def finish_rank() -> None:
    """End a spawned rank whose work is done: destroy the process groups, then leave at once.

    With a DeviceMesh's sub-groups alive, torch's gloo threads abort the process
    ("terminate called without an active exception") in about one exit in five while C++
    static objects are torn down, after every result is written. ``os._exit`` skips that
    teardown; the rank's work (files, collectives) is complete by then.
    """
    import sys

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _time_forward(layer, plan, x: torch.Tensor, warmup: int, repeat: int) -> tuple[float, dict[str, float]]:
    layer.eval()
    steps, per_phase = [], {p: [] for p in PHASES}
    for i in range(warmup + repeat):
        if plan is not None:
            plan.clock = {}
        dist.barrier()
        start = time.perf_counter()
        with torch.no_grad():
            layer(x)
        _sync(x)
        elapsed = time.perf_counter() - start
        took = _slowest(elapsed)
        if i < warmup:
            continue
        steps.append(took)
        clock = plan.clock if plan is not None else {}
        for p in PHASES[1:]:
            per_phase[p].append(_slowest(clock.get(p, 0.0)))
        per_phase[PHASES[0]].append(_slowest(elapsed - sum(clock.values())))
    if plan is not None:
        plan.clock = None
    return statistics.median(steps), {p: statistics.median(v) for p, v in per_phase.items()}


def _time_train(layer, x: torch.Tensor, warmup: int, repeat: int) -> float:
    from moespec.parallel import reduce_gradients

    layer.train()
    steps = []
    for i in range(warmup + repeat):
        layer.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        y = layer(x)
        (y.float().sum() + layer.aux_loss).backward()
        reduce_gradients(layer)
        _sync(x)
        took = _slowest(time.perf_counter() - start)
        if i >= warmup:
            steps.append(took)
    return statistics.median(steps)


def result_table(res: EPBenchResult):
    """``(heading, rich Table)`` for printing an :class:`EPBenchResult`."""
    from rich.table import Table

    from moespec.explain import human

    head = (
        f"{res.spec_name} expert-parallel over {res.nproc} {res.device} process(es) "
        f"({'NCCL' if res.device == 'cuda' else 'gloo'}, {res.threads_per_rank} threads each), "
        f"{res.tokens_per_rank} tokens per rank; median of {res.repeat} steps, slowest rank"
    )
    t = Table()
    for col in ("pass", "step", "tokens/s (all ranks)"):
        t.add_column(col, justify="left" if col == "pass" else "right")
    t.add_row("forward", f"{res.forward_s * 1e3:.3f} ms", human(res.tokens_per_s_forward))
    train = res.forward_backward_s
    t.add_row("forward+backward", f"{train * 1e3:.3f} ms", human(res.tokens_per_s_forward_backward))
    for p, s in res.forward_phases_s.items():
        t.add_row(f"  forward: {p}", f"{s * 1e3:.3f} ms", "")
    return head, t
