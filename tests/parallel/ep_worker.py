"""Expert-parallel checks, run as ``python ep_worker.py CASE WORLD`` (spawns WORLD gloo ranks).

Each rank builds the same spec (same seed) twice: a layer it parallelizes over an ``ep`` mesh
and a single-process layer (``expert_parallel: 1``) that it runs on the concatenation of
every rank's tokens: the oracle. Outputs, aux loss, routing statistics, controller state
and every gradient must agree (expert gradients shard for shard, router gradients summed
over ranks). A failed check raises in its rank, which fails the spawn.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moespec.bench_ep import finish_rank

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"
ATOL = 1e-5

TOPK_CAP = ["layer.capacity={kind: factor, train_factor: 0.6, eval_factor: 0.9, drop_policy: score}"]
DEEPSEEK = [
    "layer.router.score=sigmoid",
    "layer.router.groups={n_groups: 2, topk_groups: 1}",
    "layer.router.expert_bias={update_rate: 0.01}",
    "layer.losses.load_balance={kind: switch, weight: 0.01, scope: sequence}",
    "layer.losses.z_loss={weight: 0.001}",
]
HETERO = [
    "layer.experts.routed=[{count: 4, kind: glu, activation: silu, d_ff: 64},"
    " {count: 2, kind: mlp, activation: gelu, d_ff: 96, bias: true}]"
]

# case -> (spec file, overrides, tokens per rank (a rank with none included), 3-D batches?)
CASES: dict[str, tuple[str, list[str], list[int], bool]] = {
    "topk_capacity": ("debug-tiny.yaml", TOPK_CAP, [5, 0, 9, 3], False),
    "batch_priority": (
        "debug-tiny.yaml",
        [TOPK_CAP[0].replace("score", "batch_priority")],
        [6, 2, 0, 7],
        False,
    ),
    "deepseek_groups_bias": ("debug-tiny.yaml", DEEPSEEK, [2, 1, 0, 3], True),
    "hetero_shared_zero": ("debug-hetero.yaml", HETERO, [7, 4, 1, 0], False),
    "round_robin": ("debug-tiny.yaml", ["placement.mapping=round_robin"], [3, 8, 1, 2], False),
    "explicit_mapping": ("debug-tiny.yaml", ["placement.mapping=[1, 0, 0, 1]"], [4, 6], False),
    "all_on_one_rank": ("debug-tiny.yaml", [], [5, 6, 2, 3], False),
    "top_p_entropy": (  # dense routing with a router loss (a token mean)
        "debug-tiny.yaml",
        ["layer.router={kind: top_p, threshold: 0.4, renormalize: false, entropy_weight: 0.01}"],
        [6, 3, 0, 5],
        False,
    ),
}
# Routers that couple tokens route within each rank's tokens: checked against the
# single-process layer on this rank's tokens alone (outputs only; losses stay global).
PER_RANK_CASES: dict[str, list[str]] = {
    "soft_moe_per_rank": [
        "layer.router={kind: soft_moe, slots_per_expert: 2, group_size: 8}",
        "layer.losses={}",
    ],
    "base_per_rank": ["layer.router={kind: base}", "layer.losses={}"],
    "sinkhorn_per_rank": ["layer.router={kind: sinkhorn, k: 1}", "layer.losses={}"],
    "expert_choice_per_rank": [
        "layer.router={kind: expert_choice, capacity_factor: 1.0, min_capacity: 1}",
        "layer.losses={z_loss: {weight: 0.001}}",
    ],
}


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _inputs(sizes: list[int], seq: bool, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (lambda n: (n, 4, d)) if seq else (lambda n: (n, d))
    return [torch.randn(shape(n), generator=g) for n in sizes]


def _check_case(case: str, rank: int, world: int, mesh) -> None:
    import moespec
    from moespec.parallel import parallelize

    spec, overrides, all_sizes, seq = CASES[case]
    sizes = all_sizes[:world]
    path = SPECS / spec
    single = moespec.build(path, [o for o in overrides if not o.startswith("placement.")], seed=3)
    layer = moespec.build(path, [*overrides, f"placement.expert_parallel={world}"], seed=3)
    if case == "all_on_one_rank":  # zero router: every token picks experts 0 and 1 (rank 0's)
        for m in (single, layer):
            m.router.weight.data.zero_()
    assert parallelize(layer, mesh) is layer
    xs = _inputs(sizes, seq, single.d_model)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for training in (True, False):
        layer.train(training)
        single.train(training)
        x = xs[rank].clone().requires_grad_()
        x_all = torch.cat(xs).requires_grad_()
        y, y_all = layer(x), single(x_all)
        _close(f"{case} y (train={training})", y, y_all[start:stop])
        _close(f"{case} aux_loss", layer.aux_loss, single.aux_loss)
        for key, value in layer.routing_stats.items():
            _close(f"{case} routing_stats[{key}]", value, single.routing_stats[key])
        if not training:
            continue
        r_all = torch.randn(y_all.shape, generator=torch.Generator().manual_seed(2))
        (y * r_all[start:stop]).sum().add(layer.aux_loss).backward()
        (y_all * r_all).sum().add(single.aux_loss).backward()
        _close(f"{case} grad x", x.grad, x_all.grad[start:stop])
        _compare_grads(case, layer, single)
        for name, buf in layer.named_buffers():
            _close(f"{case} buffer {name}", buf, single.get_buffer(name))


def _check_replay(rank: int, world: int, mesh) -> None:
    """Routing replay under expert parallelism: a recording of another model on all tokens,
    each rank replaying its tokens' slice, equals one process replaying the whole recording
    (output, aux loss, statistics, every gradient)."""
    import moespec
    from moespec.parallel import parallelize

    path, sizes = SPECS / "debug-tiny.yaml", [5, 6, 2, 3][:world]
    source = moespec.build(path, seed=9)
    single = moespec.build(path, seed=3)
    layer = parallelize(moespec.build(path, [f"placement.expert_parallel={world}"], seed=3), mesh)
    xs = _inputs(sizes, False, single.d_model)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x_all = torch.cat(xs)
    with torch.no_grad(), moespec.record_routing(source) as rec:
        source(x_all)
    mine = moespec.RoutingRecording({"": [rec.experts[""][0][start:stop]]})
    x, x_all = xs[rank].clone().requires_grad_(), x_all.requires_grad_()
    with moespec.replay_routing(layer, mine):
        y = layer(x)
    with moespec.replay_routing(single, rec):
        y_all = single(x_all)
    _close("replay y", y, y_all[start:stop])
    _close("replay aux_loss", layer.aux_loss, single.aux_loss)
    for key, value in layer.routing_stats.items():
        _close(f"replay routing_stats[{key}]", value, single.routing_stats[key])
    r_all = torch.randn(y_all.shape, generator=torch.Generator().manual_seed(2))
    (y * r_all[start:stop]).sum().add(layer.aux_loss).backward()
    (y_all * r_all).sum().add(single.aux_loss).backward()
    _close("replay grad x", x.grad, x_all.grad[start:stop])
    _compare_grads("replay", layer, single)


GLOBAL = [
    "layer.losses.load_balance={kind: switch, weight: 0.5, scope: global}",
    "layer.losses.z_loss={weight: 0.1, scope: global}",
]


def _check_global(rank: int, world: int) -> None:
    """``scope: global`` over a data-parallel mesh (and, at 4 ranks, a (dp 2, ep 2) mesh): the
    aux loss, the routing statistics, each rank's outputs and input gradient, and the router's
    gradient summed over the ranks equal one process on every rank's tokens, whatever the
    data-parallel size; ``scope: batch`` on the same mesh differs (each rank's own tokens)."""
    from torch.distributed.device_mesh import init_device_mesh

    import moespec
    from moespec.errors import TargetError
    from moespec.parallel import parallelize

    path, sizes = SPECS / "debug-tiny.yaml", [5, 0, 9, 3] if world == 4 else [5, 4][:world]
    xs = _inputs(sizes, False, 32)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    meshes = {"dp": (init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)), 1)}
    if world == 4:
        meshes["dp_ep"] = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")), 2)
    single = moespec.build(path, GLOBAL, seed=3)
    x_all = torch.cat(xs).requires_grad_()
    y_all = single(x_all)
    r_all = torch.randn(y_all.shape, generator=torch.Generator().manual_seed(2))
    (y_all * r_all).sum().add(single.aux_loss).backward()
    for name, (mesh, ep) in meshes.items():
        layer = moespec.build(path, [*GLOBAL, f"placement.expert_parallel={ep}"], seed=3)
        parallelize(layer, mesh)
        x = xs[rank].clone().requires_grad_()
        y = layer(x)
        _close(f"global/{name} y", y, y_all[start:stop].detach())
        _close(f"global/{name} aux_loss", layer.aux_loss, single.aux_loss)
        for key, value in layer.routing_stats.items():
            _close(f"global/{name} routing_stats[{key}]", value, single.routing_stats[key])
        (y * r_all[start:stop]).sum().add(layer.aux_loss).backward()
        _close(f"global/{name} grad x", x.grad, x_all.grad[start:stop])
        router = layer.router.weight.grad.clone()
        dist.all_reduce(router)  # each rank's part of the one loss
        _close(f"global/{name} router grad (summed)", router, single.router.weight.grad)
    placed = moespec.build(path, [*GLOBAL, f"placement.expert_parallel={world}"], seed=3)
    try:  # a dp-only mesh places no experts: refused before anything changes
        parallelize(placed, meshes["dp"][0])
        raise AssertionError("expert_parallel > 1 on a mesh without 'ep' was accepted")
    except TargetError as e:
        assert "no 'ep' dimension" in str(e) and not hasattr(placed, "_stats"), e
    batch = moespec.build(path, [g.replace("global", "batch") for g in GLOBAL], seed=3)
    if 0 < sizes[rank] < sum(sizes):  # the micro-batch's own statistics: not the global loss
        batch(xs[rank])
        assert not torch.allclose(batch.aux_loss, single.aux_loss), (batch.aux_loss, single.aux_loss)


def _check_per_rank(case: str, rank: int, world: int, mesh) -> None:
    import moespec
    from moespec.parallel import parallelize

    path, overrides = SPECS / "debug-tiny.yaml", PER_RANK_CASES[case]
    single = moespec.build(path, overrides, seed=3)
    layer = parallelize(moespec.build(path, [*overrides, f"placement.expert_parallel={world}"], seed=3), mesh)
    x = torch.randn(4 + 3 * rank, 32, generator=torch.Generator().manual_seed(rank))
    for training in (True, False):
        layer.train(training)
        single.train(training)
        _close(f"{case} y (train={training})", layer(x), single(x))
    if case.startswith("soft_moe"):  # statistics count every rank's slot rows
        rows = layer.routing_stats["routed_per_expert"]
        assert int(rows.sum()) == 2 * 4 * world, rows


def _compare_grads(case: str, layer, single) -> None:
    from torch.distributed.tensor import DTensor

    from moespec.parallel import reduce_gradients

    reduce_gradients(layer)  # the replicated parameters' parts summed over the ranks
    want = dict(single.named_parameters())
    plan = layer._ep
    for name, p in layer.named_parameters():
        ref = want[name].grad
        if name.startswith("experts."):
            grad = p.grad
            if isinstance(p, DTensor):
                assert isinstance(grad, DTensor), f"{name}: the grad of a DTensor parameter is a DTensor"
                grad = grad.to_local()
            rows = plan.local_rows[int(name.split(".")[1])]
            if rows.numel() == 0:  # this rank holds none of the group's experts
                assert grad is None, name
                continue
            _close(f"{case} grad {name} (this rank's experts)", grad, ref[rows])
        else:  # replicated: each rank's part, summed by reduce_gradients
            _close(f"{case} grad {name} (summed over ranks)", p.grad, ref)


def _check_checkpoint(rank: int, world: int, mesh, tmp: str) -> None:
    """Save at one EP degree, load at another (1, 2 on a (dp, ep) mesh, world): the same
    weights bit for bit, for a DTensor-sharded and a locally held (round-robin) mapping."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import moespec
    from moespec.parallel import parallelize

    path = SPECS / "debug-tiny.yaml"
    want = moespec.build(path, seed=5).state_dict()
    meshes = {1: None, world: mesh}
    if world == 4:
        meshes[2] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))

    def make(ep: int, mapping: str, seed: int):
        m = moespec.build(
            path, [f"placement.expert_parallel={ep}", f"placement.mapping={mapping}"], seed=seed
        )
        return parallelize(m, meshes[ep]) if ep > 1 else m

    for mapping in ("contiguous", "round_robin"):
        for save_ep in meshes:
            where = f"{tmp}/{mapping}-{save_ep}"
            dcp.save(make(save_ep, mapping, seed=5).state_dict(), checkpoint_id=where)
            for load_ep in meshes:
                layer = make(load_ep, mapping, seed=9)
                state = layer.state_dict()
                dcp.load(state, checkpoint_id=where)
                layer.load_state_dict(state)
                for key, value in layer.state_dict().items():
                    full = value.full_tensor() if isinstance(value, DTensor) else value
                    assert torch.equal(full, want[key]), f"{mapping} {save_ep} -> {load_ep}: {key}"
                if load_ep > 1:  # a single-process state dict (an artifact's weights) loads too
                    layer = make(load_ep, mapping, seed=9)
                    layer.load_state_dict(want)
                    y = layer(torch.ones(2, 32))
                    _close(
                        f"{mapping} ep {load_ep} from a full state dict",
                        y,
                        moespec.build(path, seed=5)(torch.ones(2, 32)),
                    )


def _check_artifact(rank: int, world: int, mesh, tmp: str) -> None:
    """``moespec.load(DIR, mesh=mesh)``: an artifact built at EP ``world`` loads straight into
    the sharded layer and computes what the single-process layer computes."""
    import moespec

    path, out = SPECS / "debug-tiny.yaml", f"{tmp}/artifact"
    if rank == 0:
        moespec.build_artifact(path, out, [f"placement.expert_parallel={world}"], seed=4)
    dist.barrier()
    layer = moespec.load(out, mesh=mesh)
    assert layer.expert_parallel_ranks == world
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(rank))
    _close("artifact loaded with a mesh", layer(x), moespec.build(path, seed=4)(x))


def _check_fsdp(rank: int, world: int) -> None:
    """A (dp 2, ep 2) mesh: parallelize over ep, then FSDP2's fully_shard over dp. Each ep group
    (mesh rows {0, 1} and {2, 3}) equals one process on its tokens; FSDP averages the gradient
    over dp, reduce_gradients sums the replicated parameters' parts over ep."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import moespec

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    path, overrides = SPECS / "debug-tiny.yaml", TOPK_CAP
    single = moespec.build(path, overrides, seed=3)
    layer = moespec.build(path, [*overrides, "placement.expert_parallel=2"], seed=3)
    fully_shard(moespec.parallelize(layer, mesh), mesh=mesh["dp"])
    sizes = [5, 3, 0, 6]
    xs = _inputs(sizes, False, 32)
    y = layer(xs[rank])
    y.square().sum().add(layer.aux_loss).backward()
    moespec.reduce_gradients(layer)
    total = 0.0
    for group in ((0, 1), (2, 3)):  # one process per ep group; the losses of both summed
        x_g = torch.cat([xs[r] for r in group])
        y_g = single(x_g)
        total = total + y_g.square().sum() + single.aux_loss
        if rank in group:
            start = sum(sizes[r] for r in group if r < rank)
            _close("fsdp y", y, y_g[start : start + sizes[rank]])
            _close("fsdp aux_loss", layer.aux_loss, single.aux_loss)
    total.backward()
    want = dict(single.named_parameters())
    for name, p in layer.named_parameters():
        assert isinstance(p, DTensor), f"{name} is not sharded by FSDP"
        _close(f"fsdp grad {name} (x dp size)", p.grad.full_tensor() * 2, want[name].grad)


def _check_errors(rank: int, world: int, mesh) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import moespec
    from moespec.errors import TargetError
    from moespec.parallel import parallelize

    path = SPECS / "debug-tiny.yaml"

    def expect(fn, *words: str) -> None:
        try:
            fn()
        except TargetError as e:
            assert all(w in str(e) for w in words), str(e)
        else:
            raise AssertionError(f"no error; expected one naming {words}")

    wrong = moespec.build(path, [f"placement.expert_parallel={6 - world}"], seed=0)  # 4 at 2 ranks, 2 at 4
    expect(lambda: parallelize(wrong, mesh), "placement.expert_parallel", f"{world} ranks")
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    ok = moespec.build(path, [f"placement.expert_parallel={world}"], seed=0)
    expect(lambda: parallelize(ok, flat), "'ep' dimension", "dp")
    expect(lambda: ok(torch.randn(3, 32)), "placement.expert_parallel", "moespec.parallelize")
    parallelize(ok, mesh)
    expect(lambda: parallelize(ok, mesh), "already parallelized")


def _run(rank: int, world: int, port: int, tmp: str, cases: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        for case in cases:
            if case == "global":
                _check_global(rank, world)
            elif case == "errors":
                _check_errors(rank, world, mesh)
            elif case == "replay":
                _check_replay(rank, world, mesh)
            elif case == "checkpoint":
                _check_checkpoint(rank, world, mesh, tmp)
            elif case in PER_RANK_CASES:
                _check_per_rank(case, rank, world, mesh)
            elif case == "fsdp":
                _check_fsdp(rank, world)
            elif case == "artifact":
                _check_artifact(rank, world, mesh, tmp)
            else:
                _check_case(case, rank, world, mesh)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish_rank()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    world, cases = int(sys.argv[1]), sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(world, _free_port(), tmp, cases), nprocs=world)
    print("ok", world, *cases)
