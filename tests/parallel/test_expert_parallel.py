"""Expert parallelism over gloo ranks on the CPU against one process on the concatenated tokens.

The checks live in ``ep_worker.py`` (a script: spawned ranks must import it by path); each
test runs it for a world size and a list of cases and fails with the failing rank's traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ep_worker.py")


def run_worker(world: int, *cases: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(world), *cases], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.strip().endswith(" ".join(cases))


def test_two_ranks_every_case() -> None:
    """Top-k with capacity (score and batch priority), DeepSeek-V3 groups with expert bias and a
    sequence-scope loss, heterogeneous widths with shared and zero-compute experts (local
    shards), round-robin and explicit mappings, all tokens on one rank's experts, a rank with
    no tokens, top-p with its entropy loss, expert choice, Soft MoE, BASE and Sinkhorn routing
    within each rank, the errors, an artifact loaded with a mesh, and routing replay (each rank
    replaying its tokens' slice of a recording)."""
    run_worker(
        2,
        "topk_capacity",
        "batch_priority",
        "deepseek_groups_bias",
        "hetero_shared_zero",
        "round_robin",
        "explicit_mapping",
        "all_on_one_rank",
        "top_p_entropy",
        "expert_choice_per_rank",
        "soft_moe_per_rank",
        "base_per_rank",
        "sinkhorn_per_rank",
        "errors",
        "artifact",
        "replay",
    )


@pytest.mark.parametrize("world", [2, 4])
def test_global_scope(world: int) -> None:
    """``scope: global`` losses and statistics over a ``dp`` mesh (and a (dp 2, ep 2) mesh at 4
    ranks) equal one process on every rank's tokens; ``batch`` does not."""
    run_worker(world, "global")


@pytest.mark.parametrize(
    "cases", [("topk_capacity", "deepseek_groups_bias", "round_robin", "all_on_one_rank", "errors")]
)
def test_four_ranks(cases: tuple[str, ...]) -> None:
    run_worker(4, *cases)


def test_bench_nproc_cli() -> None:
    """``moespec bench SPEC --nproc 2``: the expert-parallel step over 2 gloo processes, with
    the forward's phases; bad uses are usage errors."""
    import json

    spec = str(WORKER.parents[2] / "specs" / "debug-tiny.yaml")
    base = [sys.executable, "-m", "moespec", "bench", spec, "--tokens", "8", "--repeat", "1", "--warmup", "0"]
    out = subprocess.run([*base, "--nproc", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout)
    assert res["nproc"] == 2 and res["tokens_per_rank"] == 8 and res["device"] == "cpu"
    assert set(res["forward_phases_s"]) == {"routing+rest", "dispatch+combine", "all-to-all", "experts"}
    bad = subprocess.run([*base, "--nproc", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--nproc must be >= 1" in bad.stderr
    import torch

    if torch.cuda.device_count() < 2:  # NCCL needs a GPU per rank
        gpu = subprocess.run([*base, "--nproc", "2", "--device", "cuda"], capture_output=True, text=True)
        assert gpu.returncode == 2 and "GPU(s) visible" in gpu.stderr, gpu.stderr


def test_global_scope_in_one_process_is_batch() -> None:
    """Without a mesh, ``scope: global`` runs over this call's tokens: the same aux loss and
    statistics as ``batch``."""
    import torch

    import moespec

    spec = WORKER.parents[2] / "specs" / "debug-tiny.yaml"
    over = [
        "layer.losses.load_balance={kind: switch, weight: 0.5, scope: %s}",
        "layer.losses.z_loss={weight: 0.1, scope: %s}",
    ]
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    glob, batch = (moespec.build(spec, [o % s for o in over], seed=1) for s in ("global", "batch"))
    torch.testing.assert_close(glob(x), batch(x))
    torch.testing.assert_close(glob.aux_loss, batch.aux_loss)
    assert glob.aux_loss > 0
    for key, value in glob.routing_stats.items():
        torch.testing.assert_close(value, batch.routing_stats[key])
