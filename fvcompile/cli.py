"""The `fvcompile` command: `models`, `bench`, `inspect`, `report`, `calibrate` and `generate`."""
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


def _writable_file(text: str, example: str) -> Path:
    """A file we will be able to write once the run ends: a run of many minutes must not end
    with its results unwritten. Probed with a temporary file in its folder (permissions, ACLs,
    read-only mounts, root: the kernel answers all of them)."""
    path = Path(text)
    folder = path.parent
    way_out = f"give a file path in an existing folder you can write, e.g. {example}"
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file: {way_out}")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist: create it first, or {way_out}")
    _probe_folder(folder, way_out)
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and cannot be overwritten: {way_out}")
    return path


def _probe_folder(folder: Path, way_out: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fvcompile-probe-"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f"cannot write into folder {folder} ({e.strerror}): {way_out}") from None


def _json_path_arg(text: str) -> Path:
    return _writable_file(text, "--json bench.json")


def _csv_path_arg(text: str) -> Path:
    return _writable_file(text, "--csv bench.csv")


def _markdown_path_arg(text: str) -> Path:
    return _writable_file(text, "--markdown bench.md")


def _plot_path_arg(text: str) -> Path:
    return _writable_file(text, "--plot decode.png")


def _folder_arg(text: str) -> Path:
    """A folder we can write into at the end of the run: an existing one, or one whose parent
    exists (it is created then)."""
    path = Path(text)
    way_out = "give a folder you can write, or a new one in an existing folder"
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: {way_out}")
    probe = path if path.is_dir() else path.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"folder {probe} does not exist: create it first, or {way_out}")
    _probe_folder(probe, way_out)
    return path


def _record_arg(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file: give two `fvcompile bench --json` records")
    return path


def _fraction_arg(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.05 or 5%, got {text!r}")
    return value


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
    if args.compare:
        _compare_runs(args)
        return
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fvcompile import bench
    from fvcompile.bench.cold import prime_compiler
    from fvcompile.bench.env import environment
    from fvcompile.bench.grid import default_models
    from fvcompile.bench.outputs import print_record, run_record

    console = _console()
    settings = _bench_settings(args)
    models = args.models.split(",") if args.models else default_models(args.size)
    tasks = args.task.split(",")
    env = environment(settings.device)  # the date and the machine's load as the run starts
    cells = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        job = progress.add_task("benchmarking", total=len(models) * len(tasks))
        if set(settings.modes) - {"eager"}:
            progress.update(job, description="a first compile, so that the first variant is not charged for it")
            prime_compiler(settings.device)
        for name in models:
            for task in tasks:
                cells += bench.bench_model(name, task, settings, on_progress=lambda text: progress.update(
                    job, description=escape(text)))
                progress.advance(job)
    record = run_record(cells, settings, env)
    print_record(console, record)
    for path in _write_outputs(record, args):
        console.print(f"wrote {escape(str(path))}", soft_wrap=True)


def _bench_settings(args):
    """The run's Settings: --quick's or the full run's, with every flag given on top."""
    from fvcompile.bench.grid import Settings

    given = {key: getattr(args, key) for key in ("rounds", "iters", "warmup", "cold")
             if getattr(args, key) is not None}
    given.update(modes=tuple(args.modes.split(",")), batch_size=args.batch_size, device=args.device,
                 dtype=args.dtype, ablation=not args.no_ablation,
                 pass_sets=tuple(p if p == "auto" else tuple(p) for p in (args.passes or ["auto"])))
    return Settings.quick(**given) if args.quick else Settings(**given)


def _write_outputs(record: dict, args) -> list[Path]:
    from fvcompile.bench import outputs

    written = []
    if args.out:
        written += outputs.write_all(record, args.out, outputs.default_stem(record))
    for flag, write in (("json", outputs.write_json), ("csv", outputs.write_csv),
                        ("markdown", outputs.write_markdown)):
        path = getattr(args, flag)
        if path:
            write(record, path)
            written.append(path)
    if args.plots:
        from fvcompile.bench.plots import write_plots

        written += write_plots(record, args.plots)
    return written


def _compare_runs(args) -> None:
    from rich.markup import escape

    from fvcompile.bench.compare import compare_records
    from fvcompile.bench.outputs import load_record

    old, new = (load_record(path) for path in args.compare)
    comparison = compare_records(old, new, force=args.force, speedup_noise=args.noise)
    console = _console()
    for line in comparison.lines():
        console.print(escape(line), soft_wrap=True)


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
        if args.html:
            _write_html(args.from_dir, args.html, "all" if args.rank is None else args.rank, args.max_nodes)
        else:
            _print_dumps(args.from_dir, args.rank)
        return
    if not (args.model and (args.out or args.html)):
        args.usage_error("give a model and --out DIR (or --html DIR) to compile and dump, or --from DIR to read a dump")
    if args.rank is not None:
        args.usage_error("--rank picks a rank of a dump read with --from DIR")
    if args.out is None:  # --html alone: the dump goes beside the page
        args.out = str(Path(args.html) / "dump")
    _compile_and_dump(args)
    if args.html:
        passes = args.passes if isinstance(args.passes, str) else ",".join(args.passes) or "none"
        _write_html(args.out, args.html, "all", args.max_nodes,
                    title=f"fvcompile inspect {args.model} (passes: {passes}; {args.task}, {args.device})")


def cmd_report(args) -> None:
    _write_html(args.dump_dir, args.html or args.dump_dir, "all" if args.rank is None else args.rank, args.max_nodes)


def _write_html(dump_dir: str, out: str, rank, max_nodes: int, title: str | None = None) -> None:
    from rich.markup import escape

    from fvcompile.html_report import write_html_report

    path = write_html_report(dump_dir, out, rank=rank, max_nodes=max_nodes, title=title)
    _console().print(f"wrote {escape(str(path))}: open it in a browser (one file, works offline)", soft_wrap=True)


def _compile_and_dump(args) -> None:
    import torch

    import fvcompile
    from fvcompile.models.registry import get

    spec = get(args.model)
    torch.manual_seed(0)
    model = spec.build().to(args.device)
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
    if not args.html:
        console.print(f"all of it on one page: fvcompile report {args.out}", soft_wrap=True, markup=False)


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


def _token_ids_arg(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 504,3575,282, got {text!r}")
    return ids


def _temperature_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: greedy), got {text!r}")
    return value


def cmd_generate(args) -> None:
    import time

    from rich.markup import escape

    import fvcompile
    from fvcompile.generation.checks import cache_length, model_context
    from fvcompile.generation.loading import load_model
    from fvcompile.generation.prompts import as_rows

    if args.top_k is not None and args.temperature == 0:
        args.usage_error(f"--top-k {args.top_k} samples among the k likeliest tokens, but --temperature 0 is greedy "
                         "decoding: give --temperature > 0 (e.g. 0.8) to sample, or drop --top-k")
    if args.prompt_lookup and args.temperature != 0:
        args.usage_error("--prompt-lookup keeps greedy decoding's output and serves greedy decoding only: "
                         "drop --temperature, or drop --prompt-lookup to sample")
    console = _console()
    with console.status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, args.device)
    if args.prompt is not None and tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (random weights): give the prompt as token ids, "
                         "--prompt-ids 1,2,3, or use smollm2-135m for text")
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    settings = dict(temperature=args.temperature, top_k=args.top_k, passes=args.passes, compile=not args.no_compile,
                    tokenizer=tokenizer, prompt_lookup=args.prompt_lookup)
    longest = max(len(row) for row in as_rows(prompt, tokenizer)[0])
    # One cache length for the warm-up and the run: the compiled decode step keeps its shapes.
    cache_len = cache_length(longest + args.max_new_tokens + args.prompt_lookup, model_context(model))
    if not args.no_compile:
        with console.status(f"compiling {args.model}'s prefill and decode steps (tens of seconds on CPU)"):
            start = time.perf_counter()
            fvcompile.generate(model, prompt, max_new_tokens=min(2, args.max_new_tokens), cache_len=cache_len,
                               **settings)
        console.print(f"compiled in {time.perf_counter() - start:.1f} s (a warm-up run of 2 tokens)")
    out = fvcompile.generate(model, prompt, max_new_tokens=args.max_new_tokens, cache_len=cache_len, **settings)
    if out.text is not None:
        console.print(f"[dim]{escape(args.prompt)}[/dim]{escape(out.text[0])}", soft_wrap=True)
    else:
        console.print(f"new token ids: {out.rows()[0]}", soft_wrap=True)
    how = "compiled" if not args.no_compile else "eager, static KV cache"
    how += f", passes {args.passes}" if args.passes != "auto" else ""
    how += f", prompt lookup {args.prompt_lookup}: {out.drafts_accepted} drafted tokens kept" if args.prompt_lookup else ""
    console.print(f"{len(out.rows()[0])} new tokens in {out.forwards} forwards: time to first token "
                  f"{out.time_to_first_token_s * 1e3:.1f} ms, then {out.tokens_per_s:.1f} tokens/s ({how})")
    if args.profile or args.plot:
        _profile_decode(console, model, longest, args)


def _profile_decode(console, model, prompt_len: int, args) -> None:
    from rich.markup import escape

    from fvcompile.generation.profile import profile_variants, table, write_plot

    with console.status("profiling the decode step (a compiled step with kernel profiling compiles anew)"):
        profiles = profile_variants(model, prompt_len=prompt_len, passes=args.passes, compiled=not args.no_compile)
    console.print(table(profiles))
    if args.plot:
        write_plot(profiles, args.plot, title=f"{args.model}: decode step after {prompt_len} prompt tokens")
        console.print(f"wrote {escape(str(args.plot))}", soft_wrap=True)


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

    p = sub.add_parser("bench", help="the benchmark suite: eager vs Inductor vs fvcompile on registry models",
                       description="Every model (--models, or all of --size) x task x variant (eager, inductor, "
                                   "fvcompile with each --passes set): pass rate, speedup vs eager and vs Inductor "
                                   "(interleaved rounds), cold and warm compile time, peak memory, graph breaks, "
                                   "recompilations, per-pass attribution; --compare OLD NEW compares two runs.")
    p.add_argument("--models", type=_models_arg, default=None,
                   help="comma-separated registry names (default: every model of --size)")
    p.add_argument("--size", choices=["tiny", "paper"], default="tiny",
                   help="the models run when --models is not given: tiny (test configs, default) or paper")
    p.add_argument("--task", type=_tasks_arg, default="infer,train", help="infer, train or both (default both)")
    p.add_argument("--modes", type=_modes_arg, default="eager,inductor,fvcompile")
    p.add_argument("--passes", type=_passes_arg, action="append", metavar="SET",
                   help="a pass set for the fvcompile variant: 'auto' or comma-separated pass names; repeat "
                        "for more variants (--passes auto --passes sparse24); default auto")
    p.add_argument("--quick", action="store_true",
                   help="a short run for a laptop: 3 rounds of 3 steps, cold compiles in this process")
    p.add_argument("--rounds", type=_positive_int, help="interleaved timing rounds, >= 1 (default 5; --quick 3)")
    p.add_argument("--iters", type=_positive_int,
                   help="timed steps per variant and round, >= 1 (default 10; --quick 3)")
    p.add_argument("--warmup", type=_non_negative_int,
                   help="untimed steps after the first, >= 0 (default 3; --quick 1)")
    p.add_argument("--batch-size", type=_positive_int, default=2, help=">= 1 (default 2)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cold", choices=["process", "in-process"], default=None,
                   help="where each variant's cold compile runs, in a fresh Inductor cache: a fresh "
                        "interpreter (default) or this process (--quick)")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the per-pass attribution (each rewriting pass left out of its set)")
    p.add_argument("--json", type=_json_path_arg,
                   help="also write the results to this JSON file (its folder is checked before the run)")
    p.add_argument("--csv", type=_csv_path_arg, help="also write every cell to this CSV file")
    p.add_argument("--markdown", type=_markdown_path_arg, help="also write the tables as markdown")
    p.add_argument("--plots", type=_folder_arg, metavar="DIR", help="also write the PNG plots into DIR")
    p.add_argument("--out", type=_folder_arg, metavar="DIR",
                   help="write JSON, CSV, markdown and plots into DIR, named bench_<device>_<date>")
    p.add_argument("--compare", type=_record_arg, nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="print the regressions and improvements beyond noise between two runs (runs nothing)")
    p.add_argument("--force", action="store_true", help="with --compare: compare runs of different devices")
    p.add_argument("--noise", type=_fraction_arg, default=0.05,
                   help="with --compare: the smallest speedup change reported (default 0.05, i.e. 5%%)")
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
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--html", metavar="OUT",
                   help="also write the HTML report to OUT/index.html (the dump goes to OUT/dump without --out)")
    p.add_argument("--max-nodes", type=_positive_int, default=1000,
                   help="with --html: graphs with more nodes are summarized, not drawn (default 1000)")
    p.set_defaults(fn=cmd_inspect, usage_error=p.error)

    p = sub.add_parser("report", help="write the HTML report of a dump folder (inspect's --out, optimize's dump_dir=)",
                       description="One self-contained HTML page of a dump: per graph the pass pipeline, each "
                                   "pass's graph before and after (drawn, changes highlighted) and its diff, graph "
                                   "statistics, Inductor's IR and code, kernels with their FX nodes and source lines, "
                                   "and the OptimizeReport.")
    p.add_argument("dump_dir", help="the dump folder")
    p.add_argument("--html", metavar="OUT", help="folder for index.html (default: the dump folder)")
    p.add_argument("--rank", type=_rank_arg, metavar="N|all", help="the rank to show, or 'all' (default)")
    p.add_argument("--max-nodes", type=_positive_int, default=1000,
                   help="graphs with more nodes are summarized, not drawn (default 1000)")
    p.set_defaults(fn=cmd_report)

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

    p = sub.add_parser("generate", help="continue a prompt with a decoder: compiled prefill and decode steps, "
                                        "a static KV cache",
                       description="Greedy or sampled decoding through fvcompile.generate. smollm2-135m runs its "
                                   "real weights and tokenizer; other registry decoders have random weights and no "
                                   "tokenizer (give --prompt-ids).")
    p.add_argument("model", help="registry name of a decoder (llama or chameleon family; see `fvcompile models`)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt as text (needs a model with a tokenizer)")
    prompt.add_argument("--prompt-ids", type=_token_ids_arg, metavar="IDS", help="the prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help=">= 1 (default 32)")
    p.add_argument("--temperature", type=_temperature_arg, default=0.0, help="0: greedy (default); > 0 samples")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--passes", type=_passes_arg, default="auto", help="'auto' or comma-separated pass names")
    p.add_argument("--no-compile", action="store_true", help="run the cached decoding eagerly")
    p.add_argument("--prompt-lookup", type=_non_negative_int, default=0, metavar="K",
                   help="prompt-lookup decoding: check up to K drafted tokens per forward (greedy output kept)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--profile", action="store_true",
                   help="then split a decode step's time (torch.profiler), eager and compiled: kernels per op class "
                        "(attention, FFN linears, other linears, other), launch overhead, host")
    p.add_argument("--plot", type=_plot_path_arg, metavar="FILE.png", help="write the profile as a plot (implies --profile)")
    p.set_defaults(fn=cmd_generate, usage_error=p.error)
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
