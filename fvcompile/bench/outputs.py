"""A run as people and machines read it: the JSON record, CSV, markdown and the console's tables.

The record (`run_record`) holds everything; the other forms are views of it, so a saved run
prints and plots as a fresh one does. The markdown and the console show the same columns.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from fvcompile.bench.env import device_description, environment
from fvcompile.bench.metrics import attribution_rows, summary_rows

SCHEMA = 1


def run_record(cells: list, settings, env: dict | None = None) -> dict:
    """The machine record of a run: where and when (`env`, taken as the run starts; now if not
    given), how (settings), every cell, and the summary and attribution rows computed from them."""
    rows = [c if isinstance(c, dict) else c.to_dict() for c in cells]
    env = env or environment(settings.device)
    return {"schema": SCHEMA, "device": device_description(settings.device), "date": env["date"],
            "environment": env, "settings": settings.to_dict(), "results": rows,
            "summary": summary_rows(rows), "attribution": attribution_rows(rows)}


def load_record(path) -> dict:
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or "results" not in record:
        raise ValueError(f"{path} is not a `fvcompile bench --json` record (no 'results')")
    return record


def write_json(record: dict, path) -> None:
    Path(path).write_text(json.dumps(record, indent=1) + "\n")


def write_csv(record: dict, path) -> None:
    """Every cell, one row each, every field (lists and dicts as JSON text)."""
    rows = record["results"]
    fields = list(rows[0]) if rows else ["model", "task", "variant", "status"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


# ---- formatting -------------------------------------------------------------------------------

def times(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def seconds(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def with_spread(mid, lo, hi) -> str:
    """"1.23x (1.20-1.25)": the median ratio and its quartiles."""
    if mid is None:
        return "-"
    if lo is None or hi is None:
        return times(mid)
    return f"{mid:.2f}x ({lo:.2f}-{hi:.2f})"


def status_text(cell: dict) -> str:
    if cell["status"] == "ok" and not cell.get("reason"):
        return "ok"
    return f"{cell['status']}: {cell.get('reason', '')}".rstrip(": ")


SUMMARY_COLUMNS = [
    ("task", lambda r: r["task"]),
    ("variant", lambda r: r["variant"]),
    ("pass rate", lambda r: f"{r['passed']}/{r['models']}"),
    ("speedup vs eager (geomean)", lambda r: times(r["speedup"])),
    ("vs Inductor", lambda r: times(r["speedup_vs_inductor"])),
    ("memory vs eager", lambda r: times(r["memory_ratio"])),
    ("cold compile s (mean)", lambda r: seconds(r["compile_cold_s"])),
    ("warm compile s", lambda r: seconds(r["compile_warm_s"])),
    ("cold compile vs Inductor", lambda r: times(r["compile_cold_vs_inductor"])),
    ("graph breaks", lambda r: str(r["graph_breaks"])),
    ("recompilations", lambda r: str(r["recompilations"])),
]

CELL_COLUMNS = [
    ("model", lambda c: c["model"]),
    ("task", lambda c: c["task"]),
    ("variant", lambda c: c["variant"] + (f" (without {c['left_out']})" if c.get("ablation_of") else "")),
    ("ms/step", lambda c: "-" if c.get("median_ms") is None else f"{c['median_ms']:.2f}"),
    ("speedup vs eager", lambda c: with_spread(c.get("speedup"), c.get("speedup_lo"), c.get("speedup_hi"))),
    ("vs Inductor", lambda c: with_spread(c.get("speedup_vs_inductor"), c.get("speedup_vs_inductor_lo"),
                                          c.get("speedup_vs_inductor_hi"))),
    ("cold / warm compile s", lambda c: "-" if c["mode"] == "eager" else
     f"{seconds(c.get('compile_cold_s'))} / {seconds(c.get('compile_warm_s'))}"),
    ("memory vs eager", lambda c: times(c.get("memory_ratio"))),
    ("breaks / recompiles", lambda c: "-" if c.get("graph_breaks") is None else
     f"{c['graph_breaks']} / {c['recompilations']}"),
    ("status", status_text),
]

ATTRIBUTION_COLUMNS = [
    ("model", lambda r: r["model"]),
    ("task", lambda r: r["task"]),
    ("pass set", lambda r: r["pass_set"]),
    ("pass", lambda r: r["pass"]),
    ("sites", lambda r: str(r["rewritten"])),
    ("speedup from the pass", lambda r: with_spread(r["speedup"], r["speedup_lo"], r["speedup_hi"])
     if r["status"] == "ok" else r["reason"]),
    ("memory with / without", lambda r: times(r["memory_ratio"])),
    ("compile cost s (cold / warm)", lambda r: f"{_signed(r['compile_cost_cold_s'])} / "
                                               f"{_signed(r['compile_cost_warm_s'])}"),
]


def _signed(v) -> str:
    return "-" if v is None else f"{v:+.1f}"


def _rows(columns, rows) -> list[list[str]]:
    return [[fn(r) for _, fn in columns] for r in rows]


# ---- markdown ---------------------------------------------------------------------------------

def markdown_table(columns, rows) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(clean(v) for v in row) + " |" for row in _rows(columns, rows)]
    return "\n".join(lines)


def environment_line(record: dict) -> str:
    env = record.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    load = env.get("load_average")
    return (f"{env.get('device', record.get('device', '?'))}; {versions}; {record.get('date', '?')}; "
            f"commit {env.get('commit') or '?'}" + (f"; load average at start {load[0]}" if load else ""))


def to_markdown(record: dict) -> str:
    """The run for a README: where it ran, the summary, the per-pass attribution, every cell."""
    parts = [f"Ran on {environment_line(record)}.", "", "### Summary (geometric means over the models)", "",
             markdown_table(SUMMARY_COLUMNS, record["summary"])]
    if record.get("attribution"):
        parts += ["", "### Per-pass attribution (each pass left out of its set, in the same run)", "",
                  markdown_table(ATTRIBUTION_COLUMNS, record["attribution"])]
    parts += ["", "### Every cell", "", markdown_table(CELL_COLUMNS, record["results"])]
    return "\n".join(parts) + "\n"


def write_markdown(record: dict, path) -> None:
    Path(path).write_text(to_markdown(record))


# ---- console ----------------------------------------------------------------------------------

# Columns a console table keeps whole (names to read and copy); the others wrap.
WHOLE = ("model", "task", "variant", "pass set", "pass")


def rich_table(title: str, columns, rows):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for header, _ in columns:
        table.add_column(header, no_wrap=header in WHOLE, overflow="fold")
    for row in _rows(columns, rows):
        table.add_row(*(escape(text) for text in row))  # "fvcompile[auto]" is no markup tag
    return table


def print_record(console, record: dict) -> None:
    """The cells, the attribution and the summary, summary last (what a person reads first)."""
    from rich.markup import escape

    console.print(rich_table("every cell", CELL_COLUMNS, record["results"]))
    if record.get("attribution"):
        console.print(rich_table("per-pass attribution", ATTRIBUTION_COLUMNS, record["attribution"]))
    console.print(rich_table("summary (geometric means)", SUMMARY_COLUMNS, record["summary"]))
    console.print(escape(f"fvcompile bench on {environment_line(record)}"), soft_wrap=True)


def write_all(record: dict, folder, stem: str) -> list[Path]:
    """JSON, CSV, markdown and the plots of one run into `folder`, named `stem.*`."""
    from fvcompile.bench.plots import write_plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.json", folder / f"{stem}.csv", folder / f"{stem}.md"]
    write_json(record, paths[0])
    write_csv(record, paths[1])
    write_markdown(record, paths[2])
    return paths + write_plots(record, folder / f"{stem}_plots")


def default_stem(record: dict) -> str:
    """bench_<device>_<date>: e.g. bench_cpu_2026-12-07T1400."""
    env = record.get("environment", {})
    kind = env.get("device_type", "cpu")
    if kind == "cuda":
        name = env.get("device", "cuda").lower()
        kind = next((g for g in ("h200", "h100", "a100", "l4") if g in name), "cuda")
    date = record.get("date", "")[:16].replace(":", "")
    return f"bench_{kind}_{date}"
