"""A run's plots, as PNG files: speedup per model, speedup per pass, compile time, memory.

Drawn from the JSON record (outputs.run_record), with matplotlib's file-only backend (no display
needed). Each plot has one panel per task, models along x and one bar per variant.
"""
from __future__ import annotations

from pathlib import Path

from fvcompile.bench.records import PASSING


def write_plots(record: dict, folder) -> list[Path]:
    """Every plot the record has data for, into `folder`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cells = [c for c in record["results"] if not c.get("ablation_of")]
    title = record.get("environment", {}).get("device") or record.get("device", "")
    written = []
    for name, draw in (("speedup", _speedup), ("compile_time", _compile_time), ("memory", _memory),
                       ("passes", _passes)):
        fig = draw(cells, record.get("attribution", []), title)
        if fig is not None:
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written.append(path)
            import matplotlib.pyplot as plt

            plt.close(fig)
    return written


def _panels(tasks: list[str], width_per_model: float, n_models: int):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6.0, width_per_model * n_models), 3.6 * len(tasks)),
                             squeeze=False)
    return fig, [a[0] for a in axes]


def _grouped_bars(ax, models: list[str], series: dict[str, list], low=None, high=None, base: float = 0.0) -> None:
    """One group of bars per model, one bar per series; None values leave a gap. low/high: the
    spread per series (error bars from the bar's value). base: where bars start (1 for ratios, so
    that a slowdown points down)."""
    import numpy as np

    width = 0.8 / max(len(series), 1)
    x = np.arange(len(models))
    for i, (label, values) in enumerate(series.items()):
        heights = [v - base if v is not None else float("nan") for v in values]  # nan: no bar
        err = None
        if low and high:
            err = [[_gap(h, l, below=True) for h, l in zip(values, low[label])],
                   [_gap(h, u, below=False) for h, u in zip(values, high[label])]]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, bottom=base, label=label, yerr=err,
               capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)


def _gap(value, bound, below: bool) -> float:
    """The error bar's length from a bar's value to its quartile (0 where either is missing)."""
    if value is None or bound is None:
        return 0.0
    return max(value - bound if below else bound - value, 0.0)


def _by_task(cells: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in cells:
        out.setdefault(c["task"], []).append(c)
    return out


def _series(cells: list[dict], key: str, variants: list[str], models: list[str]) -> dict[str, list]:
    value = {(c["model"], c["variant"]): (c.get(key) if c["status"] in PASSING else None) for c in cells}
    return {v: [value.get((m, v)) for m in models] for v in variants}


def _variant_panels(cells, title: str, key: str, ylabel: str, skip_eager: bool, spread: tuple | None = None,
                    ref_line: float | None = None, log: bool = False):
    tasks = _by_task(cells)
    if not tasks or not any(c.get(key) is not None for c in cells):
        return None
    models = list(dict.fromkeys(c["model"] for c in cells))
    fig, axes = _panels(list(tasks), 0.9, len(models))
    for ax, (task, group) in zip(axes, tasks.items()):
        variants = [v for v in dict.fromkeys(c["variant"] for c in group) if not (skip_eager and v == "eager")]
        low = high = None
        if spread:
            low, high = (_series(group, k, variants, models) for k in spread)
        _grouped_bars(ax, models, _series(group, key, variants, models), low, high, base=ref_line or 0.0)
        if ref_line is not None:
            ax.axhline(ref_line, color="black", linewidth=0.8)
        if log:
            _ratio_axis(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{task}: {title}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _ratio_axis(ax) -> None:
    """A log axis labelled as ratios ("0.5x", "2x"): a 2x slowdown as far from 1 as a 2x speedup.
    Called once the bars are drawn (it widens their range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    low, high = ax.get_ylim()
    ax.set_ylim(min(low, 0.5), max(high, 2.0))  # at least 0.5x to 2x: ticks to read a bar against


def _speedup(cells, _attribution, device: str):
    return _variant_panels(cells, f"speedup vs eager ({device})", "speedup", "eager time / time", True,
                           spread=("speedup_lo", "speedup_hi"), ref_line=1.0, log=True)


def _compile_time(cells, _attribution, device: str):
    return _variant_panels(cells, f"cold compile time ({device})", "compile_cold_s", "seconds", True)


def _memory(cells, _attribution, device: str):
    return _variant_panels(cells, f"peak memory of a step vs eager ({device})", "memory_ratio",
                           "peak / eager's peak", True, ref_line=1.0, log=True)


def _passes(_cells, attribution: list[dict], device: str):
    """What each pass buys: time without it / time with it, per model, from the ablation."""
    rows = [r for r in attribution if r.get("status") == "ok" and r.get("speedup") is not None]
    if not rows:
        return None
    fake_cells = [{"model": f"{r['model']} [{r['pass_set']}]", "task": r["task"], "variant": r["pass"],
                   "status": "ok", "speedup": r["speedup"], "speedup_lo": r["speedup_lo"],
                   "speedup_hi": r["speedup_hi"]} for r in rows]
    return _variant_panels(fake_cells, f"speedup from each pass, in its set ({device})", "speedup",
                           "time without / time with", False, spread=("speedup_lo", "speedup_hi"), ref_line=1.0,
                           log=True)
