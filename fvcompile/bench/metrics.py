"""What a run's cells add up to: the geometric-mean summary rows and the per-pass attribution.

Plain functions of the cells as dicts (a `CellResult.to_dict()`, or a row of a JSON record read
back), so that a saved run is summarized the way a fresh one is.
"""
from __future__ import annotations

import math

from fvcompile.bench.measure import quartiles
from fvcompile.bench.records import PASSING


def geomean(values) -> float | None:
    """The geometric mean of the positive finite values; None where there is none."""
    logs = [math.log(v) for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(logs) / len(logs)) if logs else None


def mean(values) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


def round_ratios(base_ms: list[float], ms: list[float]) -> list[float]:
    """base / this, round by round (both timed in the same interleaved rounds)."""
    return [b / t for b, t in zip(base_ms, ms) if t > 0]


def speedup_stats(base_ms: list[float], ms: list[float]) -> tuple[float | None, float | None, float | None]:
    """(median, 25th, 75th percentile) of the per-round ratios base / this; None without rounds."""
    ratios = round_ratios(base_ms, ms)
    if not ratios:
        return None, None, None
    lo, mid, hi = quartiles(ratios)
    return mid, lo, hi


def summary_rows(cells: list[dict]) -> list[dict]:
    """One row per (task, variant) over the models, ablation variants aside: pass rate, geometric
    means of the speedups (against eager and against Inductor), of the memory ratio and of the
    cold compile time's ratio to Inductor's; mean compile times; graph breaks and recompilations."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        if not c.get("ablation_of"):
            groups.setdefault((c["task"], c["variant"]), []).append(c)
    inductor_cold = {(c["model"], c["task"]): c.get("compile_cold_s") for c in cells
                     if c["variant"] == "inductor" and c["status"] in PASSING}
    rows = []
    for (task, variant), group in groups.items():
        ok = [c for c in group if c["status"] in PASSING]
        rows.append({
            "task": task, "variant": variant, "models": len(group), "passed": len(ok),
            "pass_rate": len(ok) / len(group),
            "speedup": geomean(c.get("speedup") for c in ok),
            "speedup_vs_inductor": geomean(c.get("speedup_vs_inductor") for c in ok),
            "memory_ratio": geomean(c.get("memory_ratio") for c in ok),
            "compile_cold_s": mean(c.get("compile_cold_s") for c in ok),
            "compile_warm_s": mean(c.get("compile_warm_s") for c in ok),
            "compile_cold_vs_inductor": geomean(
                _ratio(c.get("compile_cold_s"), inductor_cold.get((c["model"], task))) for c in ok),
            "graph_breaks": sum(c.get("graph_breaks") or 0 for c in ok),
            "recompilations": sum(c.get("recompilations") or 0 for c in ok),
            "failures": sorted({c["status"] for c in group if c["status"] not in PASSING}),
        })
    return rows


def _ratio(a, b):
    return a / b if a is not None and b else None


def attribution_rows(cells: list[dict]) -> list[dict]:
    """Per-pass attribution: for each ablation cell (a pass set with one pass left out), what that
    pass buys in the full set, measured in the same rounds: speedup (time without / time with,
    median and quartiles of the per-round ratios), memory (with / without) and compile cost
    (seconds with minus without, cold and warm)."""
    full = {(c["model"], c["task"], c["passes"]): c for c in cells
            if c["mode"] == "fvcompile" and not c.get("ablation_of")}
    rows = []
    for c in cells:
        if not c.get("ablation_of"):
            continue
        with_it = full.get((c["model"], c["task"], c["ablation_of"]))
        row = {"model": c["model"], "task": c["task"], "pass_set": c["ablation_of"], "pass": c["left_out"],
               "rewritten": (with_it or {}).get("rewritten", {}).get(c["left_out"], 0),
               "status": "ok", "reason": "", "speedup": None, "speedup_lo": None, "speedup_hi": None,
               "memory_ratio": None, "compile_cost_cold_s": None, "compile_cost_warm_s": None}
        if with_it is None or with_it["status"] not in PASSING or c["status"] not in PASSING:
            failed = c if c["status"] not in PASSING else with_it
            row.update(status="failed", reason=f"{failed['variant']}: {failed['status']} {failed['reason']}".strip()
                       if failed else "the full pass set was not measured")
            rows.append(row)
            continue
        row["speedup"], row["speedup_lo"], row["speedup_hi"] = speedup_stats(c["round_ms"], with_it["round_ms"])
        row["memory_ratio"] = _ratio(with_it.get("peak_mb"), c.get("peak_mb"))
        row["compile_cost_cold_s"] = _difference(with_it.get("compile_cold_s"), c.get("compile_cold_s"))
        row["compile_cost_warm_s"] = _difference(with_it.get("compile_warm_s"), c.get("compile_warm_s"))
        rows.append(row)
    return rows


def _difference(a, b):
    return a - b if a is not None and b is not None else None


def spread(lo: float | None, hi: float | None, mid: float | None) -> float:
    """Half the quartile range relative to the median: the noise of one speedup."""
    if lo is None or hi is None or not mid:
        return 0.0
    return (hi - lo) / 2 / mid
