"""Measuring one step function: its time (interleaved with the others of its group), its peak
memory, and what Dynamo did while it ran (graph breaks, recompilations)."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(step, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    out = step()
    sync(device)
    return time.perf_counter() - start, out


def interleaved_rounds(steps: dict, rounds: int, iters: int, device: torch.device, on_round=None,
                       around=None) -> dict[str, list[float]]:
    """{label: [median seconds of each round]}: each round times `iters` calls of every step, the
    order rotating from round to round, so that drift in the machine's load (other jobs, clocks,
    heat) falls on every variant alike and the per-round ratios between them stay fair.

    around: optional {label: context manager factory} entered around each of a step's blocks
    (the Dynamo watch of that variant)."""
    labels = list(steps)
    per_round: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        shift = r % len(labels) if labels else 0
        for label in labels[shift:] + labels[:shift]:
            block = around[label]() if around and label in around else contextlib.nullcontext()
            with block:
                times = [timed_call(steps[label], device)[0] for _ in range(iters)]
            per_round[label].append(statistics.median(times))
        if on_round:
            on_round(r + 1)
    return per_round


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler's C++ side prints two lines per profile on fd 2; a run prints many."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(step, device: torch.device) -> int:
    """The most memory one call of `step` held at once beyond what was allocated before it:
    activations, temporaries and gradients, the same for every variant of a model (the
    parameters are not counted: they are alike everywhere). CUDA: the caching allocator's peak;
    CPU: the profiler's allocation records in time order, each op's own (`self_cpu_memory_usage`:
    an op's total also holds its callees', which would count them twice) and those made outside
    any op (`[memory]` events: frees of Python-held tensors)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


@dataclass
class DynamoWatch:
    """What Dynamo compiled and where it broke graphs, for one variant, over every block of its
    calls (`with watch:`). Variants of a group run interleaved in one process, so the counts are
    taken per block: a compile that happens while a variant's calls run is that variant's.

    recompilations: compiles of a code object (a frame) this variant had compiled already. Its
    first compile of each frame is not counted, though Dynamo may call it a recompilation: the
    same frame was compiled before for another variant (another backend, or another module class).
    """

    compiles: list = field(default_factory=list)  # (co_filename, co_firstlineno, co_name, reason)
    breaks: set = field(default_factory=set)  # distinct graph-break descriptions
    _seen_metrics: set = field(default_factory=set)
    _seen_breaks: set = field(default_factory=set)

    def __enter__(self):
        self._seen_metrics = {id(m) for m in _compilation_metrics()}
        self._seen_breaks = {id(r) for r in _graph_break_records()}
        return self

    def __exit__(self, *exc):
        for m in _compilation_metrics():
            # Entries without a frame are no Dynamo compile (AOTAutograd's lazy backward compile).
            if id(m) not in self._seen_metrics and m.co_name is not None:
                self.compiles.append((m.co_filename, m.co_firstlineno, m.co_name, m.recompile_reason or ""))
        for r in _graph_break_records():
            if id(r) not in self._seen_breaks:
                self.breaks.add(_describe_break(r))
        return False

    @property
    def graph_breaks(self) -> int:
        return len(self.breaks)

    @property
    def recompilations(self) -> int:
        frames = [c[:3] for c in self.compiles]
        return len(frames) - len(set(frames))

    def recompile_reasons(self) -> list[str]:
        seen, reasons = set(), []
        for c in self.compiles:
            if c[:3] in seen and c[3]:
                reasons.append(c[3].splitlines()[0])
            seen.add(c[:3])
        return reasons


def _compilation_metrics() -> list:
    from torch._dynamo.utils import get_compilation_metrics

    return list(get_compilation_metrics())


def _graph_break_records() -> list:
    from torch._dynamo.utils import graph_break_reasons

    return list(graph_break_reasons)


def _describe_break(record) -> str:
    from fvcompile.backend import _describe_break as describe

    return describe(record)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); one value: that value thrice."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]
