"""The CPU benchmark of SimpleFSDP: 2 gloo ranks, one run, four configurations of one model.

    python bench/fsdp.py                      # llama-tiny widened to 8 blocks of 256 -> 768 -> 256
    python bench/fsdp.py --out bench/results                  # 12 steps, the last 3 profiled

Each configuration trains the same model on the same batches (`bench/fsdp_train.py`, which
spawns its own ranks) and reports the median step time, the collectives per step and the peak
memory per rank (the median over the profiled steps, the largest over the ranks):

1. FSDP2 eager (`torch.distributed.fsdp.fully_shard` per block, then the root): the baseline;
2. SimpleFSDP compiled by fvcompile with no pass: one collective per parameter;
3. SimpleFSDP compiled by Inductor with PyTorch's own FX bucketing and overlap scheduling (a
   failure is recorded as the row's result);
4. SimpleFSDP compiled by fvcompile with `passes="auto"`: our fsdp_bucketing and fsdp_reordering.

The goals (issue #17): ours issues at least 10x fewer collectives than 2, takes no longer per
step than 1, and uses no more peak memory than 1. The table says which hold, measured here.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_train  # noqa: E402  (bench/ is a folder of scripts)

MODEL_CONFIG = ["n_layers=8", "dim=256", "ffn_hidden=768", "n_heads=8", "n_kv_heads=4"]
CONFIGURATIONS = {
    "FSDP2 eager": ["--impl", "fsdp2", "--compile", "none"],
    "SimpleFSDP, no pass": ["--impl", "simple_fsdp", "--compile", "fvcompile", "--passes", "none"],
    "SimpleFSDP, PyTorch bucketing+overlap": ["--impl", "simple_fsdp", "--compile", "inductor",
                                              "--inductor-bucketing", "--inductor-overlap"],
    "SimpleFSDP, fvcompile auto (ours)": ["--impl", "simple_fsdp", "--compile", "fvcompile", "--passes", "auto"],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--config", action="append", default=None, metavar="KEY=VALUE",
                   help=f"the model's config overrides (default: {' '.join(MODEL_CONFIG)})")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=3, help="the last steps, profiled: memory is their median")
    p.add_argument("--only", action="append", choices=list(CONFIGURATIONS), help="run only these rows")
    p.add_argument("--out", help="folder for fsdp_cpu_<date>.json and .md")
    args = p.parse_args(argv)
    common = ["--nproc", "2", "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--batch", str(args.batch), "--profile-steps", str(args.profile_steps)]
    for c in args.config or MODEL_CONFIG:
        common += ["--config", c]
    rows = {}
    for name, flags in CONFIGURATIONS.items():
        if args.only and name not in args.only:
            continue
        print(f"--- {name}", flush=True)
        try:
            rows[name] = fsdp_train.run(fsdp_train.parse_args(common + flags))
        except Exception as e:  # a failed row is a row, not the end of the benchmark
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        print(_row_line(name, rows[name]), flush=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "goals": goals(rows)}
    table = markdown(record)
    print("\n" + table)
    if args.out:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"fsdp_cpu_{stamp}.json").write_text(json.dumps(record, indent=1))
        Path(args.out, f"fsdp_cpu_{stamp}.md").write_text(table)
    return record


def _collectives(row) -> int | None:
    counts = row.get("collectives_per_step") or {}
    return counts.get("total")


def _peak(row) -> int | None:
    peaks = [p["bytes"] for p in row.get("peak_memory_bytes", []) if p.get("bytes") is not None]
    return max(peaks) if peaks else None


def _row_line(name: str, row: dict) -> str:
    if "error" in row:
        return f"{name}: FAILED: {row['error']}"
    step, peak = row.get("median_step_s"), _peak(row)
    return (f"{name}: median step {step * 1e3:.1f} ms, {_collectives(row)} collectives per step, "
            f"peak {peak / 2**20:.1f} MiB per rank" if step and peak else f"{name}: {row}")


def goals(rows: dict) -> dict:
    """The issue's three goals, each with the numbers it compares (None where a row is missing)."""
    fsdp2, plain = rows.get("FSDP2 eager", {}), rows.get("SimpleFSDP, no pass", {})
    ours = rows.get("SimpleFSDP, fvcompile auto (ours)", {})
    out = {}
    if _collectives(ours) and _collectives(plain):
        ratio = _collectives(plain) / _collectives(ours)
        out["collectives: >= 10x fewer than unbucketed"] = {"ratio": ratio, "met": ratio >= 10}
    if ours.get("median_step_s") and fsdp2.get("median_step_s"):
        ratio = ours["median_step_s"] / fsdp2["median_step_s"]
        out["step time: <= FSDP2 eager"] = {"ratio": ratio, "met": ratio <= 1}
    if _peak(ours) and _peak(fsdp2):
        ratio = _peak(ours) / _peak(fsdp2)
        out["peak memory: <= FSDP2 eager"] = {"ratio": ratio, "met": ratio <= 1}
    return out


def markdown(record: dict) -> str:
    rows = record["rows"]
    first = next((r for r in rows.values() if "error" not in r), {})
    lines = [f"SimpleFSDP CPU benchmark, {record['date']}: {first.get('world_size')} ranks, "
             f"{first.get('backend')}, {first.get('device')}, torch {first.get('versions', {}).get('torch')}; "
             f"model {first.get('config', {}).get('model')} {' '.join(first.get('config', {}).get('config', []))}",
             "", "| configuration | median step (ms) | collectives per step | peak memory per rank (MiB) | note |",
             "|---|---:|---:|---:|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | | | | failed: {row['error'][:200]} |")
            continue
        step, peak = row.get("median_step_s"), _peak(row)
        knobs = row.get("inductor_options") or {}
        note = f"PyTorch's options failed: {knobs['error'][:160]}" if knobs.get("error") else ""
        lines.append(f"| {name} | {step * 1e3:.1f} | {_collectives(row)} | "
                     f"{'' if peak is None else f'{peak / 2**20:.1f}'} | {note} |")
    lines += ["", "| goal | ratio | met |", "|---|---:|---|"]
    for goal, g in record["goals"].items():
        lines.append(f"| {goal} | {g['ratio']:.2f} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
