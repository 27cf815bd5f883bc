"""Running the grid: each (model, task) group measured in one process, its variants interleaved.

For one group (`bench_model`):

1. eager: its outputs (the reference of every check), its step and its peak memory;
2. every compiled variant: its cold compile (in a fresh interpreter and cache, or in this process
   in a fresh cache), then its compile here, its check against eager and its peak memory;
3. per-pass attribution: for each pass set that rewrote something, the set with each rewriting
   pass left out, added to the same group;
4. the timing: rounds of `iters` steps of every variant, the order rotating (measure.py);
5. in-process cold runs: each variant compiled once more, in its cache now filled (warm).

Whatever fails is the cell's status and reason (records.py), and the run goes on.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
from dataclasses import dataclass

import torch

from fvcompile.bench import check, cold
from fvcompile.bench.grid import (Settings, Variant, ablation_variants, pass_set_from_label, pass_set_label,
                                  resolved_names)
from fvcompile.bench.measure import DynamoWatch, interleaved_rounds, peak_step_bytes
from fvcompile.bench.metrics import speedup_stats
from fvcompile.bench.records import PASSING, CellResult, failure_status, one_line
from fvcompile.bench.steps import build_model, compile_variant, make_inputs, make_step

# Every variant of a group compiles the model's frames once more (another backend, or another
# module class: fvcompile's shallow copy): Dynamo's default limit of 8 compiled versions per
# frame would send later variants to eager, silently.
RECOMPILE_LIMIT = 64
RAN = ("ok", "approximate", "mismatch")  # cells with steps to time


@dataclass
class _Live:
    """A variant that ran: what the timing rounds need."""

    cell: CellResult
    step: object
    watch: DynamoWatch
    cache_dir: str


def bench_model(name: str, task: str, settings: Settings | None = None, on_progress=None, *,
                spec=None) -> list[CellResult]:
    """Every variant of `settings` on one registry model and task, as cells (see module doc).
    `spec`: a ModelSpec to measure instead of the registry's `name` (tests)."""
    from fvcompile.models import get

    settings = settings or Settings()
    spec = spec or get(name)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), \
            tempfile.TemporaryDirectory(prefix="fvcompile-bench-") as caches:
        return _Group(name, task, spec, settings, caches, on_progress or (lambda text: None)).run()


class _Group:
    def __init__(self, name, task, spec, settings: Settings, caches: str, say):
        self.name, self.task, self.spec, self.settings = name, task, spec, settings
        self.device = torch.device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        self.caches, self.say = caches, say
        self.cells: list[CellResult] = []
        self.live: dict[int, _Live] = {}  # id(cell) -> what ran
        self.expected = None

    def run(self) -> list[CellResult]:
        eager, *compiled = self.settings.variants()
        self._add(eager)
        if self.expected is None:  # no reference: nothing else can be checked
            failed = self.cells[0]
            for v in compiled:
                self.cells.append(self._cell(v).fail("skipped", f"eager failed: {failed.status} {failed.reason}"))
            return self._visible()
        for v in compiled:
            self._add(v)
        if self.settings.ablation:
            for v in self._ablations():
                self._add(v)
        self._time()
        if self.settings.cold == "in-process":
            self._warm_compiles()
        return self._visible()

    def _visible(self) -> list[CellResult]:
        """The cells, eager's left out when the user did not ask for it (it was the baseline)."""
        if "eager" in self.settings.modes:
            return self.cells
        return [c for c in self.cells if c.mode != "eager"]

    def _cell(self, v: Variant) -> CellResult:
        return CellResult(self.name, self.task, v.label, v.mode,
                          passes=pass_set_label(v.passes) if v.mode == "fvcompile" else "",
                          ablation_of=v.ablation_of, left_out=v.left_out)

    def _add(self, v: Variant) -> None:
        cell = self._cell(v)
        self.cells.append(cell)
        try:
            self._measure(v, cell)
        except Exception as e:  # any failure is the cell's row; the run goes on
            cell.fail(failure_status(e, "runtime"), one_line(e))
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _measure(self, v: Variant, cell: CellResult) -> None:
        where = f"{self.name} {self.task} {v.label}"
        approximate: list[str] = []  # the approximate passes of the set (from fvcompile's report)
        cache_dir = tempfile.mkdtemp(dir=self.caches)
        if v.mode != "eager" and self.settings.cold == "process":
            self.say(f"{where}: cold compile in a fresh process")
            result = cold.run_child(self.name, self.task, v, self.settings, cache_dir)
            if result.status != "ok":
                cell.fail(result.status, result.reason)
                return
            cell.compile_cold_s, cell.cold_in = result.compile_s, "process"
            cell.rewritten, cell.pass_summary = result.rewritten, result.pass_summary
            approximate = result.approximate
        self.say(f"{where}: compiling" if v.mode != "eager" else f"{where}: eager reference")
        model = build_model(self.spec, self.task, self.settings.device, self.settings.dtype)
        inputs = make_inputs(self.spec, model, self.task, self.settings.batch_size)
        watch = DynamoWatch()
        try:
            runner = compile_variant(model, v)
            step = make_step(self.spec, model, runner, self.task, inputs)
            with watch, cold.cache_folder(cache_dir) if v.mode != "eager" else contextlib.nullcontext():
                compile_s, _ = cold.measure_first_call(step, self.device, steady_calls=max(self.settings.warmup, 1))
        except Exception as e:
            cell.fail(failure_status(e, "compile" if v.mode != "eager" else "runtime"), one_line(e))
            return
        if v.mode != "eager":
            if self.settings.cold == "process":
                cell.compile_warm_s = compile_s
            else:
                cell.compile_cold_s, cell.cold_in = compile_s, "in-process"
                fields = cold.report_fields(runner)
                cell.rewritten, cell.pass_summary = fields["rewritten"], fields["pass_summary"]
                approximate = fields["approximate"]
        with watch:
            outputs = check.reference_outputs(self.spec, model, runner, self.task, inputs)
            cell.peak_mb = peak_step_bytes(step, self.device) / 2**20
        if v.mode == "eager":
            self.expected = outputs
            cell.error = 0.0
        else:
            cell.error = check.relative_error(self.expected, outputs)
            rewrote = [p for p in approximate if cell.rewritten.get(p)]
            cell.status, cell.reason = check.verdict(cell.error, self.dtype, approximate=rewrote,
                                                     random=check.random_modules(model))
        self.live[id(cell)] = _Live(cell, step, watch, cache_dir)

    def _ablations(self) -> list[Variant]:
        """Leave-one-out variants of every pass set that rewrote something."""
        out = []
        for cell in list(self.cells):
            if cell.mode != "fvcompile" or cell.ablation_of or cell.status not in PASSING:
                continue
            applied = [p for p, n in cell.rewritten.items() if n]
            if applied:
                passes = pass_set_from_label(cell.passes)
                full = Variant("fvcompile", passes)
                out += ablation_variants(full, applied, resolved_names(passes, self.settings.device))
        return out

    def _time(self) -> None:
        live = [x for x in self.live.values() if x.cell.status in RAN]
        total = self.settings.rounds
        steps = {id(x.cell): x.step for x in live}
        watches = {id(x.cell): (lambda w=x.watch: w) for x in live}
        self.say(f"{self.name} {self.task}: timing {len(live)} variant(s), {total} interleaved rounds")
        try:
            rounds = interleaved_rounds(steps, total, self.settings.iters, self.device, around=watches,
                                        on_round=lambda r: self.say(f"{self.name} {self.task}: round {r}/{total}"))
        except Exception as e:  # a step that ran before and fails now: every cell says so
            for x in live:
                x.cell.fail(failure_status(e, "runtime"), f"while timing: {one_line(e)}")
            return
        by_variant = {x.cell.variant: x for x in live if not x.cell.ablation_of}
        eager, inductor = by_variant.get("eager"), by_variant.get("inductor")
        for x in live:
            c = x.cell
            c.round_ms = [t * 1e3 for t in rounds[id(c)]]
            c.median_ms = statistics.median(c.round_ms)
            c.graph_breaks, c.recompilations = x.watch.graph_breaks, x.watch.recompilations
            c.recompile_reasons = x.watch.recompile_reasons()[:5]
            if eager:
                base = [t * 1e3 for t in rounds[id(eager.cell)]]
                c.speedup, c.speedup_lo, c.speedup_hi = speedup_stats(base, c.round_ms)
                if eager.cell.peak_mb:
                    c.memory_ratio = c.peak_mb / eager.cell.peak_mb if c.peak_mb is not None else None
            if inductor:
                base = [t * 1e3 for t in rounds[id(inductor.cell)]]
                c.speedup_vs_inductor, c.speedup_vs_inductor_lo, c.speedup_vs_inductor_hi = speedup_stats(
                    base, c.round_ms)

    def _warm_compiles(self) -> None:
        """Each compiled variant once more in its own cache, filled by its first compile: the
        warm time (Dynamo reset first, so that the frames compile anew)."""
        torch._dynamo.reset()
        for x in self.live.values():
            c = x.cell
            if c.mode == "eager" or c.status not in RAN:
                continue
            self.say(f"{self.name} {self.task} {c.variant}: warm compile")
            variant = Variant(c.mode, pass_set_from_label(c.passes) if c.mode == "fvcompile" else ())
            try:
                model = build_model(self.spec, self.task, self.settings.device, self.settings.dtype)
                step = make_step(self.spec, model, compile_variant(model, variant), self.task,
                                 make_inputs(self.spec, model, self.task, self.settings.batch_size))
                with cold.cache_folder(x.cache_dir):
                    c.compile_warm_s, _ = cold.measure_first_call(step, self.device, steady_calls=1)
            except Exception as e:
                c.reason = (c.reason + "; " if c.reason else "") + f"warm compile failed: {one_line(e)}"
