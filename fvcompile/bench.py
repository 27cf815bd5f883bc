"""`fvcompile bench`: eager vs Inductor vs fvcompile on registry models, measured in one run."""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import fvcompile
from fvcompile.models import get
from fvcompile.passes import resolve_passes

MODES = ("eager", "inductor", "fvcompile")
TASKS = ("infer", "train")


@dataclass
class Measurement:
    model: str
    task: str
    mode: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    compile_s: float  # first call minus a steady-state call (0 for eager)
    speedup: float = 1.0  # eager median / this median
    passes: str = ""


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} threads (torch {torch.__version__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(spec, model, task: str, batch_size: int):
    if task == "infer":
        inputs = spec.example_inputs(model, batch_size)

        def step():
            with torch.no_grad():
                return model(*inputs)
        return step
    batch = spec.train_batch(model, batch_size)

    def step():
        loss = spec.train_step(model, batch)
        loss.backward()
        return loss
    return step


def _timed(step, device, iters: int, warmup: int) -> tuple[float, list[float]]:
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, times


def bench_model(name: str, task: str, modes=MODES, passes="auto", iters: int = 20, warmup: int = 3,
                batch_size: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32,
                on_progress=None) -> list[Measurement]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    spec = get(name)
    dev = torch.device(device)
    results = []
    for mode in modes:
        if on_progress:
            on_progress(f"{name} {task} {mode}")
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = spec.build().to(device=dev, dtype=dtype)
        if task == "infer":
            model.eval()
        summary = ""
        if mode == "inductor":
            model = torch.compile(model)
        elif mode == "fvcompile":
            model = fvcompile.optimize(model, passes=passes)
        first, times = _timed(_make_step(spec, model, task, batch_size), dev, iters, warmup)
        median = statistics.median(times)
        if mode == "fvcompile":
            summary = model.fvcompile_report.summary()
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
        results.append(Measurement(name, task, mode, median * 1e3, q[0] * 1e3, q[2] * 1e3,
                                   0.0 if mode == "eager" else max(first - median, 0.0), passes=summary))
    eager = next((r.median_ms for r in results if r.mode == "eager"), None)
    for r in results:
        r.speedup = eager / r.median_ms if eager else float("nan")
    return results


def results_table(results: list[Measurement], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "task", "mode", "median ms", "p25-p75 ms", "speedup vs eager", "compile s",
                "passes"):
        table.add_column(col)
    for r in results:
        table.add_row(r.model, r.task, r.mode, f"{r.median_ms:.2f}", f"{r.p25_ms:.2f}-{r.p75_ms:.2f}",
                      f"{r.speedup:.2f}x", f"{r.compile_s:.1f}", r.passes)
    return table


def to_json(results: list[Measurement], device: str) -> dict:
    return {"device": device, "date": time.strftime("%Y-%m-%d"), "results": [asdict(r) for r in results]}


def validate_passes(passes) -> None:
    resolve_passes(passes, torch.device("cpu"))
