"""The `fvcompile` command: `models`, `bench` and `inspect`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _console():
    from rich.console import Console

    # Wide tables stay readable when the output goes to a log instead of a terminal.
    return Console() if sys.stdout.isatty() else Console(width=160)


# Argument types: each refuses a bad value while the command line is parsed, before any model is
# built or compiled, and argparse's message names the argument ("argument --iters: ...").

def _passes_arg(text: str):
    from fvcompile.bench import validate_passes

    passes = "auto" if text == "auto" else [p for p in text.split(",") if p]  # "": no pass
    try:
        validate_passes(passes)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return passes


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _comma_list(text: str, what: str, check) -> str:
    """`text` as given, once `check(name)` accepted each of its comma-separated names."""
    names = [name for name in text.split(",") if name]
    if not names:
        raise argparse.ArgumentTypeError(f"give at least one {what}")
    for name in names:
        check(name)
    return ",".join(names)


def _choice_checker(what: str, allowed):
    def check(name: str) -> None:
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r}: choose from {', '.join(allowed)} (comma-separated)")
    return check


def _tasks_arg(text: str) -> str:
    from fvcompile.bench import TASKS

    return _comma_list(text, "task", _choice_checker("task", TASKS))


def _modes_arg(text: str) -> str:
    from fvcompile.bench import MODES

    return _comma_list(text, "mode", _choice_checker("mode", MODES))


def _models_arg(text: str) -> str:
    from fvcompile.models.registry import get

    def check(name: str) -> None:
        try:
            get(name)
        except KeyError as e:
            raise argparse.ArgumentTypeError(e.args[0]) from None
    return _comma_list(text, "model (see `fvcompile models`)", check)


def _device_arg(text: str) -> str:
    """cpu, or a CUDA device this machine has: a missing GPU is found now, not at the first model."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return text


def _json_path_arg(text: str) -> Path:
    """A file we will be able to write once the run ends: a run of many minutes must not end
    with its results unwritten. Probed with a temporary file in its folder (permissions, ACLs,
    read-only mounts, root: the kernel answers all of them)."""
    path = Path(text)
    folder = path.parent
    way_out = "give a file path in an existing folder you can write, e.g. --json bench.json"
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file: {way_out}")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist: create it first, or {way_out}")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fvcompile-probe-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write into folder {folder} ({e.strerror}): {way_out}") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and cannot be overwritten: {way_out}")
    return path


def cmd_models(args) -> None:
    from rich.table import Table

    from fvcompile.models.registry import all_specs, count_parameters

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

    from fvcompile.bench import bench_model, device_description, results_table, to_json

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


def cmd_calibrate(args) -> None:
    import torch

    from fvcompile.passes.saap_calibration import calibrate

    if args.model == "smollm2-135m":  # real weights: calibrate on real text
        from fvcompile.models.gguf_loader import load_smollm2
        from fvcompile.text import token_batches

        model, tokenizer = load_smollm2()
        batches = token_batches(tokenizer, seq_len=args.seq_len, sequences=args.sequences)
    else:
        from fvcompile.models import get

        spec = get(args.model)
        if "config" not in spec.extra or not hasattr(spec.extra["config"], "rope_base"):
            raise ValueError(f"calibrate saap serves Llama-family models (causal attention with RoPE); "
                             f"{args.model!r} is a {spec.family} model")
        torch.manual_seed(0)
        model = spec.build().eval()  # random weights: a calibration of the mechanics, not of text
        g = torch.Generator().manual_seed(0)
        vocab = spec.extra["config"].vocab_size
        batches = [torch.randint(0, vocab, (1, args.seq_len), generator=g) for _ in range(args.sequences)]
    index = calibrate(model, batches, clusters=args.clusters, probes=args.probes,
                      classifier_steps=args.classifier_steps, model_name=args.model)
    index.save(args.out)
    shapes = ", ".join(f"{k} {v}" for k, v in index.shapes.items())
    _console().print(f"wrote {args.out}: SAAP index of {args.model} ({shapes}; {args.sequences} sequences "
                     f"of {args.seq_len} tokens)")


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
    from fvcompile.models.registry import get

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
    p.add_argument("--models", type=_models_arg, default="llama-tiny",
                   help="comma-separated registry names (default llama-tiny)")
    p.add_argument("--task", type=_tasks_arg, default="infer,train", help="infer, train or both (default both)")
    p.add_argument("--modes", type=_modes_arg, default="eager,inductor,fvcompile")
    p.add_argument("--passes", type=_passes_arg, default="auto", help="'auto' or comma-separated pass names")
    p.add_argument("--iters", type=_positive_int, default=20, help="timed steps per mode, >= 1 (default 20)")
    p.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed steps, >= 0 (default 3)")
    p.add_argument("--batch-size", type=_positive_int, default=2, help=">= 1 (default 2)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", type=_json_path_arg,
                   help="also write the results to this JSON file (its folder is checked before the run)")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("inspect", help="dump every graph before/after each pass and Inductor's code, "
                                       "or read a dump back (--from)",
                       epilog="to read a dump: fvcompile inspect --from DIR [--rank N|all] "
                              "(a multi-rank run writes DIR/rank_<r>/ per rank)")
    p.add_argument("model", nargs="?", help="registry name (see `fvcompile models`)")
    p.add_argument("--out", help="directory to write into")
    p.add_argument("--passes", type=_passes_arg, default="auto")
    p.add_argument("--task", default="train", choices=["train", "infer"])
    p.add_argument("--batch-size", type=_positive_int, default=2, help=">= 1 (default 2)")
    p.add_argument("--no-codegen", action="store_true", help="skip Inductor's code generation (fast)")
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="print what an earlier run dumped into DIR (its --out, or optimize's dump_dir=)")
    p.add_argument("--rank", type=_rank_arg, metavar="N|all",
                   help="with --from: the rank to show, or 'all' (default: every rank found)")
    p.set_defaults(fn=cmd_inspect, usage_error=p.error)

    p = sub.add_parser("calibrate", help="fit an approximate pass's offline data (saap: its index)")
    p.add_argument("pass_name", choices=["saap"], help="the pass to calibrate")
    p.add_argument("--model", required=True, help="registry name; smollm2-135m: its real weights, on real text")
    p.add_argument("--out", required=True, help="the index file to write (.safetensors)")
    p.add_argument("--clusters", type=_positive_int, default=64, help="key clusters per layer and KV head (default 64)")
    p.add_argument("--probes", type=_positive_int, default=4, help="clusters a query reads by default (default 4)")
    p.add_argument("--seq-len", type=_positive_int, default=1024, help="tokens per calibration sequence")
    p.add_argument("--sequences", type=_positive_int, default=4, help="calibration sequences (default 4)")
    p.add_argument("--classifier-steps", type=_positive_int, default=200, help="Adam steps per query classifier")
    p.set_defaults(fn=cmd_calibrate)
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
