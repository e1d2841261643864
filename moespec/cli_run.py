"""The ``moespec`` commands that run a layer or a network (train, bench, tune) or convert
between moespec and transformers (convert, export): parse, call the library, print."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moespec.cli_common import _bench_progress, _one_spec, _split_args, _usage
from moespec.outputs import write_text_atomic


def cmd_train(args: argparse.Namespace) -> int:
    from moespec.ir.summary import human
    from moespec.train import TrainConfig, compare, train

    specs, overrides = _split_args(args.items)
    if args.compare:
        specs = [*specs, *args.compare]
    if not specs or (len(specs) > 1 and not args.compare):
        return _usage("moespec train: give one spec file (or several after --compare)")
    if args.steps < 1 or args.batch < 1 or args.seq_len < 1:
        return _usage("moespec train: --steps, --batch and --seq-len must be >= 1")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
        horizon=args.horizon, seed=args.seed, log_every=args.log_every, save_every=args.save_every,
        device=args.device,
    )  # fmt: skip
    with _bench_progress(sys.stderr.isatty()) as bar:
        task = bar.add_task("train", total=args.steps) if bar is not None else None

        def progress(done: int, total: int, row: dict | None) -> None:
            text = f"loss {row['loss']:.3f}  {row['tokens_per_s']:,.0f} tok/s" if row else None
            if bar is not None:
                bar.update(task, completed=done, **({"description": text} if text else {}))
            elif text:  # no terminal (a log file): one line per metrics row
                print(f"step {done}/{total}  {text}", file=sys.stderr, flush=True)

        def on_start(i: int, name: str) -> None:
            if bar is not None:
                bar.reset(task, total=args.steps, description=name)

        if args.compare:
            rows = compare(specs, overrides, out=args.out, cfg=cfg, progress=progress, on_start=on_start)
        else:
            metrics = train(specs[0], overrides, out=args.out, cfg=cfg, progress=progress)
    if args.compare:
        print(f"{'spec':<24} {'params':>10} {'active':>10} {'tokens/s':>10} {'final loss':>10}  colour")
        for r in rows:
            print(f"{r['name']:<24} {human(r['params_total']):>10} {human(r['params_active']):>10} "
                  f"{r['tokens_per_s']:>10,.0f} {r['final_loss']:>10.4f}  {r['colour']}")  # fmt: skip
        print(f"wrote {Path(args.out) / 'compare.png'} and compare.json")
        return 0
    first, last = metrics[0], metrics[-1]
    print(f"{last['step']} steps: loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f}, "
          f"aux {last['aux_loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s; run in {args.out}")  # fmt: skip
    return 0


def _bench_nproc(args: argparse.Namespace, spec: str, overrides: list[str]) -> int:
    """``moespec bench SPEC --nproc N``: the layer expert-parallel over N processes (CPU and
    gloo, or ``--device cuda``: one GPU each, NCCL)."""
    from moespec.bench_ep import bench_expert_parallel, result_table

    if args.nproc < 1:
        return _usage("moespec bench: --nproc must be >= 1")
    if Path(spec).is_dir():
        return _usage("moespec bench --nproc: takes a spec file (an artifact runs in one process)")
    try:  # ValueError: bad arguments, found before any process starts
        res = bench_expert_parallel(
            spec,
            overrides,
            nproc=args.nproc,
            layer=args.layer,
            tokens=args.tokens,
            repeat=args.repeat,
            warmup=args.warmup,
            seed=args.seed,
            device=args.device or "cpu",
        )
    except ValueError as e:
        return _usage(f"moespec bench: {e}")
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
        return 0
    from rich.console import Console

    head, table = result_table(res)
    console = Console()
    console.print(head, highlight=False)
    console.print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from moespec.bench import INFER_TOKENS, bench_infer, bench_layer, layer_for_bench, result_table

    one = _one_spec(args, "spec file or artifact directory")
    if isinstance(one, int):
        return one
    spec, overrides = one
    if args.tokens < 1 or args.repeat < 1 or args.warmup < 0:
        return _usage("moespec bench: --tokens and --repeat must be >= 1, --warmup >= 0")
    if args.nproc is not None:
        if args.infer:
            return _usage("moespec bench: --infer runs in one process (it does not take --nproc)")
        return _bench_nproc(args, spec, overrides)
    module, name, device = layer_for_bench(
        spec, overrides, layer=args.layer, seed=args.seed, device=args.device, allow_large=args.allow_large
    )
    with _bench_progress(not args.json and sys.stderr.isatty()) as bar:
        tasks: dict[str, object] = {}

        def progress(pass_name: str, step: int, total: int) -> None:
            if bar is not None:
                tasks.setdefault(pass_name, bar.add_task(pass_name, total=total))
                bar.update(tasks[pass_name], completed=step)

        common = dict(spec_name=name, repeat=args.repeat, warmup=args.warmup, device=device, seed=args.seed,
                      progress=progress, allow_large=args.allow_large)  # fmt: skip
        if args.infer:
            res = bench_infer(module, tokens=INFER_TOKENS, **common)
        else:
            res = bench_layer(module, tokens=args.tokens, **common)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        from rich.console import Console

        head, table, foot = result_table(res)
        console = Console(width=None if os.isatty(1) else 120)
        console.print(head, highlight=False, soft_wrap=True)
        console.print(table)
        console.print(foot, highlight=False)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from moespec.tune import result_table, tune

    one = _one_spec(args)
    if isinstance(one, int):
        return one
    spec, overrides = one
    if args.tokens < 1 or args.repeat < 1:
        return _usage("moespec tune: --tokens and --repeat must be >= 1")
    res = tune(spec, overrides, tokens=args.tokens, repeat=args.repeat, layer=args.layer, seed=args.seed,
               roles=not args.no_roles, table=Path(args.table) if args.table else None)  # fmt: skip
    table, foot = result_table(res)
    console = Console(width=None if os.isatty(1) else 120)
    console.print(table)
    console.print(foot, highlight=False)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moespec.hf.from_files import convert_text

    text = convert_text(args.from_hf, network=args.network)
    if args.output is None:
        print(text, end="")
        return 0
    write_text_atomic(Path(args.output), text)
    print(f"wrote {args.output}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moespec.hf.export import export_to_hf

    out = export_to_hf(Path(args.artifact), Path(args.to_hf), force=args.force)
    print(f"wrote {out}")
    return 0
