"""The `fvcompile` command: `models`, `bench` and `inspect`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _console():
    from rich.console import Console

    # Wide tables stay readable when the output goes to a log instead of a terminal.
    return Console() if sys.stdout.isatty() else Console(width=160)


def _passes_arg(text: str):
    return "auto" if text == "auto" else [p for p in text.split(",") if p]


def cmd_models(args) -> None:
    from rich.table import Table

    from fvcompile.models import all_specs, count_parameters

    table = Table(title="fvcompile models")
    for col in ("name", "family", "parameters", "reference", "paper"):
        table.add_column(col)
    for spec in all_specs():
        n = count_parameters(spec)
        ref = "-" if spec.params is None else ("exact" if spec.params == n else f"expected {spec.params:,}")
        table.add_row(spec.name, spec.family, f"{n:,}", ref, spec.paper)
    _console().print(table)


def cmd_bench(args) -> None:
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from fvcompile.bench import bench_model, device_description, results_table, to_json, validate_passes

    validate_passes(args.passes)
    console = _console()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    desc = device_description(device)
    results = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        job = progress.add_task("benchmarking", total=None)
        for name in args.models.split(","):
            for task in args.task.split(","):
                results += bench_model(name, task, args.modes.split(","), args.passes, args.iters,
                                       args.warmup, args.batch_size, args.device, dtype,
                                       on_progress=lambda text: progress.update(
                                           job, description=f"{text} (compiles take tens of seconds)"))
    console.print(results_table(results, f"fvcompile bench on {desc}, {args.dtype}"))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, desc), indent=2))
        console.print(f"wrote {args.json}")


def cmd_inspect(args) -> None:
    import torch

    import fvcompile
    from fvcompile.models import get

    spec = get(args.model)
    torch.manual_seed(0)
    model = spec.build()
    if args.task == "infer":
        model.eval()  # the inference graph `bench` measures (dropout off, BatchNorm's running stats)
    optimized = fvcompile.optimize(model, passes=args.passes, dump_dir=args.out, codegen=not args.no_codegen)
    console = _console()
    with console.status(f"compiling {args.model} ({args.task}); Inductor takes tens of seconds"):
        if args.task == "train":
            spec.train_step(optimized, spec.train_batch(model, args.batch_size)).backward()
        else:
            with torch.no_grad():
                optimized(*spec.example_inputs(model, args.batch_size))
    console.print(optimized.fvcompile_report.table())
    index = json.loads((Path(args.out) / "index.json").read_text())
    for graph, files in index["graphs"].items():
        console.print(f"[bold]{graph}[/bold]: {len(files)} files")
        for f in files:
            console.print(f"  {Path(args.out) / f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvcompile", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the registered models with parameter counts")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("bench", help="time eager vs inductor vs fvcompile on registry models")
    p.add_argument("--models", default="llama-tiny", help="comma-separated registry names (default llama-tiny)")
    p.add_argument("--task", default="infer,train", help="infer, train or both (default both)")
    p.add_argument("--modes", default="eager,inductor,fvcompile")
    p.add_argument("--passes", type=_passes_arg, default="auto", help="'auto' or comma-separated pass names")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("inspect", help="dump every graph before/after each pass and Inductor's code")
    p.add_argument("model", help="registry name (see `fvcompile models`)")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--passes", type=_passes_arg, default="auto")
    p.add_argument("--task", default="train", choices=["train", "infer"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-codegen", action="store_true", help="skip Inductor's code generation (fast)")
    p.set_defaults(fn=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        # Dynamo wraps what failed while compiling in a many-line BackendCompilerFailed: show the cause.
        cause = getattr(e, "inner_exception", None) or e
        message = (str(cause).strip().splitlines() or [""])[0]
        print(f"fvcompile {args.command}: error: {type(cause).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
