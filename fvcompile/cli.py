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
    if args.from_dir is not None:
        if args.model or args.out:
            args.usage_error("--from reads a dump already written: give it without a model or --out")
        _print_dumps(args.from_dir, args.rank)
        return
    if not (args.model and args.out):
        args.usage_error("give a model and --out DIR to compile and dump, or --from DIR to read a dump")
    if args.rank is not None:
        args.usage_error("--rank picks a rank of a dump read with --from DIR")
    _compile_and_dump(args)


def _compile_and_dump(args) -> None:
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
    _print_files(console, Path(args.out))


def _print_dumps(top: str, rank) -> None:
    """What each selected rank dumped under `top`: its report's summary and its files."""
    from rich.markup import escape

    from fvcompile.dump import SINGLE_PROCESS, select_dumps

    console = _console()
    dumps = select_dumps(top, rank if rank is not None else "all")
    for r, folder in dumps.items():
        index = json.loads((folder / "index.json").read_text())
        if r is SINGLE_PROCESS:
            title = f"single process ({folder})"
        else:
            title = f"rank {r} of {index.get('world_size', '?')} ({folder})"
        console.rule(escape(title))
        report_name = index.get("report")
        if report_name and (folder / report_name).is_file():
            report = json.loads((folder / report_name).read_text())
            console.print(f"[bold]{escape(report_name)}[/bold] (latest run)")
            for line in _report_lines(report):
                console.print("  " + escape(line), soft_wrap=True)
        _print_files(console, folder)


def _report_lines(report: dict) -> list[str]:
    """A dumped OptimizeReport (its JSON) in a few lines: graphs, what each pass did, graph
    breaks and recompilations. Read as a plain dict, so dumps of older versions still read."""
    graphs = report.get("graphs", [])
    passes = report.get("passes", [])
    lines = [f"{len(graphs)} graph(s) compiled; passes: {', '.join(passes) or 'none'}"]
    runs = [run for g in graphs for run in g.get("pass_runs", [])]
    for name in passes:
        mine = [run.get("result", {}) for run in runs if run.get("name") == name]
        rewritten = sum(len(result.get("rewritten", [])) for result in mine)
        skipped = sum(len(result.get("skipped", [])) for result in mine)
        lines.append(f"{name}: {rewritten} rewritten, {skipped} skipped, in {len(mine)} run(s)")
    if any(g.get("cache_hit") for g in graphs):
        lines.append(f"{sum(bool(g.get('cache_hit')) for g in graphs)} graph(s) served from Inductor's cache: "
                     "no pass ran on them")
    for reason, count in report.get("graph_breaks", {}).items():
        lines.append(f"graph break x{count}: {reason}")
    for g in graphs:
        if g.get("recompile_reason"):
            lines.append(f"recompilation {g.get('compile_id', '?')}: {g['recompile_reason']}")
    if report.get("ran_eagerly"):
        lines.append(f"ran eagerly: {report['ran_eagerly']}")
    return lines


def _print_files(console, folder: Path) -> None:
    """Every file of one dump folder (one rank, or a single process), per compiled graph."""
    from rich.markup import escape

    index = json.loads((folder / "index.json").read_text())
    for graph, files in index["graphs"].items():
        console.print(f"[bold]{escape(graph)}[/bold]: {len(files)} files")
        for f in files:
            console.print(f"  {escape(str(folder / f))}", soft_wrap=True)  # paths whole, to copy


def _rank_arg(text: str):
    if text == "all":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a rank number (0, 1, ...) or 'all', got {text!r}")


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

    p = sub.add_parser("inspect", help="dump every graph before/after each pass and Inductor's code, "
                                       "or read a dump back (--from)",
                       epilog="to read a dump: fvcompile inspect --from DIR [--rank N|all] "
                              "(a multi-rank run writes DIR/rank_<r>/ per rank)")
    p.add_argument("model", nargs="?", help="registry name (see `fvcompile models`)")
    p.add_argument("--out", help="directory to write into")
    p.add_argument("--passes", type=_passes_arg, default="auto")
    p.add_argument("--task", default="train", choices=["train", "infer"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--no-codegen", action="store_true", help="skip Inductor's code generation (fast)")
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="print what an earlier run dumped into DIR (its --out, or optimize's dump_dir=)")
    p.add_argument("--rank", type=_rank_arg, metavar="N|all",
                   help="with --from: the rank to show, or 'all' (default: every rank found)")
    p.set_defaults(fn=cmd_inspect, usage_error=p.error)
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
