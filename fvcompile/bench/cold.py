"""Cold compile time: a variant compiled in a fresh Inductor cache, in a fresh interpreter.

A compile right after another of the same graph hits Inductor's caches (its FX graph and
AOTAutograd caches on disk, the loaded kernels in memory): fvcompile compiled after Inductor
measured a cache hit, not a compile. Here every variant of every model gets a cache folder of its
own (`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`), filled first by a child interpreter that
compiles once and reports (the cold time); the suite's own process then compiles in the filled
folder (the warm time) and times the steps.

The child: `python -m fvcompile.bench.cold '<json>'`; it prints one line `RESULT <json>` last.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from fvcompile.bench.grid import Settings, Variant

MARK = "FVCOMPILE_BENCH_COLD "


@dataclass
class ColdResult:
    status: str = "ok"  # "ok", "compile_error", "runtime_error", "oom", "timeout"
    reason: str = ""
    compile_s: float | None = None
    rewritten: dict[str, int] = field(default_factory=dict)
    pass_summary: str = ""
    approximate: list[str] = field(default_factory=list)


def cache_env(cache_dir: str) -> dict[str, str]:
    """The environment variables that point Inductor's and Triton's caches into `cache_dir`."""
    return {"TORCHINDUCTOR_CACHE_DIR": cache_dir, "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton")}


@contextlib.contextmanager
def cache_folder(cache_dir: str):
    """Inductor's and Triton's caches in `cache_dir` for the compiles inside, in this process; the
    in-memory caches cleared on both sides, so that nothing compiled elsewhere is reused."""
    from torch._inductor import utils

    clear = getattr(utils, "clear_caches", None) or getattr(utils, "clear_inductor_caches")
    saved = {key: os.environ.get(key) for key in cache_env(cache_dir)}
    clear()
    os.environ.update(cache_env(cache_dir))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear()


@functools.cache
def prime_compiler(device: str) -> None:
    """Compile and run a trivial function once, in a throwaway cache: what the first compile of a
    process pays once (Inductor's modules imported, the C++ or Triton toolchain found) is then
    not charged to the first variant measured in this process."""
    import torch

    with tempfile.TemporaryDirectory(prefix="fvcompile-prime-") as folder, cache_folder(folder):
        fn = torch.compile(lambda x: (x * 2).relu().sum())
        fn(torch.randn(8, device=device))
    torch._dynamo.reset()


def run_child(model: str, task: str, variant: Variant, settings: Settings, cache_dir: str) -> ColdResult:
    """Compile one variant in a fresh interpreter whose caches live in the empty `cache_dir`."""
    job = {"model": model, "task": task, "mode": variant.mode,
           "passes": variant.passes if variant.passes == "auto" else list(variant.passes),
           "device": settings.device, "dtype": settings.dtype, "batch_size": settings.batch_size}
    env = {**os.environ, **cache_env(cache_dir),
           # The parent's import path first: the child imports the same fvcompile (an installed
           # one, or a checkout imported without an install).
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run([sys.executable, "-m", "fvcompile.bench.cold", json.dumps(job)], env=env,
                              capture_output=True, text=True, timeout=settings.cold_timeout_s)
    except subprocess.TimeoutExpired:
        return ColdResult("timeout", f"the cold compile ran past {settings.cold_timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return ColdResult(**json.loads(line[len(MARK):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ColdResult("compile_error", f"the cold-compile child exited with {proc.returncode}: {tail[:300]}")


def measure_first_call(step, device, steady_calls: int = 3) -> tuple[float, float]:
    """(compile seconds, steady step seconds): the first call, which compiles, minus the median
    of the steady calls after it."""
    from fvcompile.bench.measure import timed_call

    first, _ = timed_call(step, device)
    steady = statistics.median(timed_call(step, device)[0] for _ in range(steady_calls))
    return max(first - steady, 0.0), steady


def report_fields(runner) -> dict:
    """What fvcompile's report says the passes did (empty for eager and Inductor)."""
    report = getattr(runner, "fvcompile_report", None)
    if report is None:
        return {"rewritten": {}, "pass_summary": "", "approximate": []}
    return {"rewritten": {name: report.rewritten(name) for name in report.passes},
            "pass_summary": report.summary(), "approximate": list(report.approximate)}


def _child(job: dict) -> ColdResult:
    import torch

    from fvcompile.bench.records import failure_status, one_line
    from fvcompile.bench.steps import build_model, compile_variant, make_inputs, make_step
    from fvcompile.models import get

    spec = get(job["model"])
    passes = job["passes"] if job["passes"] == "auto" else tuple(job["passes"])
    variant = Variant(job["mode"], passes)
    model = build_model(spec, job["task"], job["device"], job["dtype"])
    runner = compile_variant(model, variant)
    step = make_step(spec, model, runner, job["task"], make_inputs(spec, model, job["task"], job["batch_size"]))
    try:
        compile_s, _ = measure_first_call(step, torch.device(job["device"]))
    except Exception as e:  # a failure is the cell's result, not the child's crash
        return ColdResult(failure_status(e, "compile"), one_line(e))
    return ColdResult(compile_s=compile_s, **report_fields(runner))


if __name__ == "__main__":
    from dataclasses import asdict

    result = _child(json.loads(sys.argv[1]))
    print(MARK + json.dumps(asdict(result)), flush=True)
