"""The ``moespec`` command line: a thin layer over the library that parses and prints.

Exit codes: 0 success, 1 invalid spec (or other user-input error), 2 usage error.
Results go to stdout, diagnostics to stderr. This module holds the parser, ``main`` and the
spec commands (validate, schema, explain, init, build); ``cli_run`` the commands that run or
convert (train, bench, tune, convert, export); ``cli_common`` what they share.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from moespec import __version__
from moespec.cli_common import _one_spec, _report, _split_args
from moespec.cli_run import cmd_bench, cmd_convert, cmd_export, cmd_train, cmd_tune
from moespec.errors import MoespecError, SpecError
from moespec.outputs import write_text_atomic
from moespec.spec.load import LoadedSpec, load_spec


def cmd_validate(args: argparse.Namespace) -> int:
    specs, overrides = _split_args(args.items)
    if not specs:
        print("moespec validate: give at least one spec file", file=sys.stderr)
        return 2
    results, failed = [], False
    for path in specs:
        try:
            loaded = load_spec(path, overrides)
        except SpecError as e:
            failed = True
            if args.json:
                results.append({"file": path, "ok": False, "errors": [d.to_json() for d in e.diagnostics]})
            else:
                _report(e, False)
            continue
        if args.json:
            results.append({"file": path, "ok": True, "errors": []})
        else:
            print(f"{path}: ok ({loaded.spec.name})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def cmd_schema(args: argparse.Namespace) -> int:
    from moespec.spec.jsonschema import json_schema_text

    text = json_schema_text()
    if args.output:
        write_text_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def _load_one(args: argparse.Namespace) -> LoadedSpec:
    """The one spec of ``args.items``, loaded; a usage error leaves with SystemExit(2)."""
    one = _one_spec(args)
    if isinstance(one, int):
        raise SystemExit(one)
    return load_spec(*one)


def cmd_explain(args: argparse.Namespace) -> int:
    from moespec.explain import explain_data, print_explain

    loaded = _load_one(args)
    if args.ir:
        from moespec.ir.build import build_program
        from moespec.ir.printer import print_program

        sys.stdout.write(print_program(build_program(loaded.spec)))
        return 0
    if args.json:
        print(json.dumps(explain_data(loaded, args.tokens, args.seq_len), indent=2))
    else:
        print_explain(loaded, args.tokens, args.seq_len)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from moespec.starter import starter_text

    out = Path(args.path)
    if out.exists() and not args.force:
        print(f"{out}: already exists (use --force to overwrite)", file=sys.stderr)
        return 1
    text = starter_text(out, schema=args.schema, name=args.name or out.stem)
    write_text_atomic(out, text)  # parents created, never a half-written spec
    print(f"wrote {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from moespec.export.artifact import build_artifact
    from moespec.export.network import network_summary_text
    from moespec.export.report import summary_text

    one = _one_spec(args)
    if isinstance(one, int):
        return one
    spec, overrides = one
    art = build_artifact(
        spec, args.output, overrides, layer=args.layer, seed=args.seed, force=args.force,
        allow_large=args.allow_large, meta=args.meta,
    )  # fmt: skip
    print(f"wrote {art.path}/: {', '.join(sorted(p.name for p in art.path.iterdir()))}")
    network = art.manifest["layer"] == "<model>"  # moespec.runtime.layout.NETWORK
    sys.stdout.write(network_summary_text(art.report) if network else summary_text(art.report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the README's CLI reference and tests)."""
    p = argparse.ArgumentParser(prog="moespec", description="Declarative MoE spec compiler for PyTorch.")
    p.add_argument("--version", action="version", version=f"moespec {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    over = "overrides: a.b=v sets, +a.b=v adds, ~a.b deletes (v is YAML)"
    v = sub.add_parser("validate", help="check spec files; print every error compiler-style")
    v.add_argument("items", nargs="+", metavar="SPEC|OVERRIDE", help=f"spec files, then {over}")
    v.add_argument("--json", action="store_true", help="machine-readable results")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("schema", help="print the JSON Schema of the spec language")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(func=cmd_schema)

    e = sub.add_parser("explain", help="resolved spec with provenance and derived numbers")
    e.add_argument("items", nargs="+", metavar="SPEC|OVERRIDE", help=f"one spec file, then {over}")
    e.add_argument("--json", action="store_true", help="machine-readable output (`layers` list)")
    e.add_argument("--ir", action="store_true", help="print the resolved IR instead")
    e.add_argument(
        "--tokens",
        type=int,
        default=4096,
        metavar="N",
        help="tokens per rank for the expert-parallel all-to-all bytes (default 4096)",
    )
    e.add_argument(
        "--seq-len",
        type=int,
        metavar="N",
        help="sequence length of the whole model's attention FLOPs (default: model.max_seq_len)",
    )
    e.set_defaults(func=cmd_explain)

    i = sub.add_parser("init", help="write a starter spec with the schema modeline (parents created)")
    i.add_argument("path", nargs="?", default="moe.yaml", help="file to write (default: moe.yaml)")
    i.add_argument("--name", help="spec name (default: the file name)")
    i.add_argument(
        "--schema",
        help="schema path or URL for the modeline (default: the installed schema's absolute file:// URI, "
        "so the spec can be moved)",
    )
    i.add_argument("--force", action="store_true", help="overwrite an existing file")
    i.set_defaults(func=cmd_init)

    b = sub.add_parser("build", help="write an artifact directory: module.py, weights, lock, report")
    b.add_argument("items", nargs="+", metavar="SPEC|OVERRIDE", help=f"one spec file, then {over}")
    b.add_argument("-o", "--output", required=True, metavar="DIR", help="artifact directory to write")
    b.add_argument(
        "--layer",
        help="layer group to build (required when the spec has several and no model: section); with "
        "model:, the network is built unless a layer design is named (`layer` for the base layer)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation (default: 0)")
    b.add_argument("--force", action="store_true", help="replace DIR if it is an existing artifact")
    b.add_argument(
        "--allow-large", action="store_true", help="build even if the weights may not fit in memory"
    )
    b.add_argument(
        "--meta",
        action="store_true",
        help="write the weights one tensor at a time without holding the layer (same file; for "
        "layers larger than this machine's memory)",
    )
    b.set_defaults(func=cmd_build)

    bn = sub.add_parser("bench", help="time forward and forward+backward of a built layer here")
    bn.add_argument(
        "items", nargs="+", metavar="SPEC|OVERRIDE", help=f"one spec file (or artifact dir), then {over}"
    )
    bn.add_argument("--tokens", type=int, default=256, help="tokens per batch (default: 256)")
    bn.add_argument("--repeat", type=int, default=5, help="timed runs per pass, median shown (default: 5)")
    bn.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    bn.add_argument("--layer", help="layer group to build (required when the spec has several)")
    bn.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    bn.add_argument("--device", help="cpu or cuda (default: the spec's target.device)")
    bn.add_argument(
        "--allow-large", action="store_true", help="run even if weights or activations may not fit in memory"
    )
    bn.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="run expert-parallel over N local CPU processes (gloo; --tokens per rank) and split the step",
    )
    bn.add_argument(
        "--infer",
        action="store_true",
        help="inference table: eval forward at 1, 8, 64, 256 and 2048 tokens (decode to prefill)",
    )
    bn.add_argument("--json", action="store_true", help="machine-readable output")
    bn.set_defaults(func=cmd_bench)

    t = sub.add_parser("train", help="train a spec's network (model: section) on generated text")
    t.add_argument("items", nargs="*", metavar="SPEC|OVERRIDE", help=f"one spec file, then {over}")
    t.add_argument(
        "--out", required=True, metavar="DIR", help="run directory (resumed when it holds the run)"
    )
    t.add_argument("--steps", type=int, required=True, help="train until this many steps are done")
    t.add_argument("--compare", nargs="+", metavar="SPEC", help="train these specs too, on the same data")
    t.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    t.add_argument("--seq-len", type=int, default=64, help="bytes per sequence (default: 64)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of AdamW (default: 3e-3)")
    t.add_argument("--warmup", type=int, default=20, help="linear warmup steps (default: 20)")
    t.add_argument(
        "--horizon", type=int, help="steps of the cosine decay (default: --steps of the first run)"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default: 0)")
    t.add_argument("--log-every", type=int, default=10, help="steps between metrics rows (default: 10)")
    t.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    t.set_defaults(func=cmd_train)

    cv = sub.add_parser("convert", help="write the spec of a transformers config's MoE layers")
    cv.add_argument(
        "--from-hf",
        required=True,
        metavar="CONFIG.json|MODEL_DIR",
        help="a transformers config (not downloaded)",
    )
    cv.add_argument("-o", "--output", metavar="SPEC.yaml", help="write here (default: stdout)")
    cv.add_argument(
        "--network",
        action="store_true",
        help="add the whole network's model: section (Mixtral, Qwen3-MoE, OLMoE)",
    )
    cv.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="write a network artifact as a transformers checkpoint")
    ex.add_argument("artifact", metavar="DIR", help="a network artifact (moespec build of a model: spec)")
    ex.add_argument(
        "--to-hf", required=True, metavar="OUT", help="checkpoint directory (config.json, model.safetensors)"
    )
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.set_defaults(func=cmd_export)

    tn = sub.add_parser(
        "tune", help="time Triton block sizes on this GPU; write the best to the tuning table"
    )
    tn.add_argument("items", nargs="+", metavar="SPEC|OVERRIDE", help=f"one spec file, then {over}")
    tn.add_argument("--tokens", type=int, default=4096, help="tokens per batch (default: 4096)")
    tn.add_argument("--repeat", type=int, default=5, help="timed runs per candidate (default: 5)")
    tn.add_argument("--layer", help="layer group to tune (required when the spec has several)")
    tn.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    tn.add_argument(
        "--no-roles", action="store_true", help="one tile for every kernel (skip the role-by-role pass)"
    )
    tn.add_argument(
        "--table", help="tuning table to write (default: $MOESPEC_TUNING or ~/.cache/moespec/tuning.json)"
    )
    tn.set_defaults(func=cmd_tune)
    return p


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moespec`` console script. SIGTERM is handled like SIGINT: the
    work in progress cleans up (a build removes its temporary folder) and the exit code is
    143 (130 for SIGINT)."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except SpecError as e:
        _report(e, getattr(args, "json", False))
        return 1
    except MoespecError as e:
        print(f"moespec: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as e:  # one no command turned into a MoespecError: still one line, with the path
        if e.filename is None:
            raise
        print(f"moespec: error: {os.fsdecode(e.filename)}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
