"""`fvcompile bench --compare OLD.json NEW.json`: what got better or worse beyond noise.

Cells are matched by model, task and variant. Compared: whether the cell passes, its speedups
(against eager and against Inductor: ratios measured within each run, so a busier machine moves
them less than raw times), its cold compile time and its memory ratio. A speedup's noise is the
larger of a floor and either run's spread (half the quartile range of its per-round ratios); a
change beyond it is reported. Runs of different devices are refused (their ratios measure
different machines), unless forced; different versions are said first, then compared.
"""
from __future__ import annotations

from dataclasses import dataclass

from fvcompile.bench.metrics import spread
from fvcompile.bench.records import PASSING

# Noise floors: relative changes smaller than these are not reported.
SPEEDUP_NOISE = 0.05
COMPILE_NOISE = 0.15  # compile times are raw seconds: the machine's load moves them more
MEMORY_NOISE = 0.02


class DifferentDevices(ValueError):
    pass


@dataclass
class Change:
    kind: str  # "regression" or "improvement"
    cell: str  # "model task variant"
    metric: str
    old: object
    new: object
    change: float | None = None  # relative: new / old - 1
    noise: float | None = None

    def line(self) -> str:
        if self.change is None:
            return f"{self.cell}: {self.metric}: {self.old} -> {self.new}"
        return (f"{self.cell}: {self.metric} {_fmt(self.old)} -> {_fmt(self.new)} ({self.change:+.1%}, "
                f"noise {self.noise:.1%})")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclass
class Comparison:
    notes: list[str]  # said before the changes: devices, versions, settings, cells not in both
    changes: list[Change]

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "regression"]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "improvement"]

    def lines(self) -> list[str]:
        out = list(self.notes)
        out.append(f"{len(self.regressions)} regression(s), {len(self.improvements)} improvement(s) beyond noise")
        out += [f"  regression: {c.line()}" for c in self.regressions]
        out += [f"  improvement: {c.line()}" for c in self.improvements]
        return out


def environment_notes(old: dict, new: dict, force: bool = False) -> list[str]:
    """What differs between where the two runs ran. Raise DifferentDevices for two devices
    unless `force`."""
    eo, en = old.get("environment", {}), new.get("environment", {})
    notes = []
    dev_old, dev_new = eo.get("device", old.get("device")), en.get("device", new.get("device"))
    if dev_old != dev_new:
        message = f"the runs are of different devices: {dev_old} (old) vs {dev_new} (new)"
        if not force:
            raise DifferentDevices(message + "; their ratios measure different machines (--force compares anyway)")
        notes.append("warning: " + message)
    vo, vn = eo.get("versions", {}), en.get("versions", {})
    for name in sorted(set(vo) | set(vn)):
        if vo.get(name) != vn.get(name):
            notes.append(f"warning: different {name}: {vo.get(name) or '-'} (old) vs {vn.get(name) or '-'} (new)")
    so, sn = old.get("settings", {}), new.get("settings", {})
    for key in ("rounds", "iters", "batch_size", "dtype", "cold"):
        if so.get(key) != sn.get(key):
            notes.append(f"note: different {key}: {so.get(key)} (old) vs {sn.get(key)} (new)")
    return notes


def _key(c: dict) -> tuple:
    return c["model"], c["task"], c["variant"], c.get("ablation_of", "")


def _name(key: tuple) -> str:
    model, task, variant, ablation_of = key
    return f"{model} {task} {variant}" + (f" (ablation of {ablation_of})" if ablation_of else "")


def compare_cells(old: dict, new: dict, speedup_noise: float = SPEEDUP_NOISE) -> list[Change]:
    """The changes of one cell beyond noise (see the module docstring)."""
    name = _name(_key(new))
    was_ok, is_ok = old["status"] in PASSING, new["status"] in PASSING
    if was_ok != is_ok:
        kind = "regression" if was_ok else "improvement"
        return [Change(kind, name, "status", old["status"], f"{new['status']} {new.get('reason', '')}".strip())]
    if not is_ok:
        return []
    changes = []
    # A baseline against itself is 1 by definition; eager's ratio to Inductor is Inductor's speedup.
    ratios = {"eager": (), "inductor": ("speedup",)}.get(new["variant"], ("speedup", "speedup_vs_inductor"))
    for metric in ratios:
        a, b = old.get(metric), new.get(metric)
        if not a or not b:
            continue
        noise = max(speedup_noise, spread(old.get(f"{metric}_lo"), old.get(f"{metric}_hi"), a),
                    spread(new.get(f"{metric}_lo"), new.get(f"{metric}_hi"), b))
        changes += _beyond(name, metric, a, b, noise, higher_is_better=True)
    for metric, noise in (("compile_cold_s", COMPILE_NOISE), ("memory_ratio", MEMORY_NOISE)):
        a, b = old.get(metric), new.get(metric)
        if a and b:
            changes += _beyond(name, metric, a, b, noise, higher_is_better=False)
    return changes


def _beyond(name: str, metric: str, a: float, b: float, noise: float, higher_is_better: bool) -> list[Change]:
    change = b / a - 1
    if abs(change) <= noise:
        return []
    better = (change > 0) == higher_is_better
    return [Change("improvement" if better else "regression", name, metric, a, b, change, noise)]


def compare_records(old: dict, new: dict, *, force: bool = False, speedup_noise: float = SPEEDUP_NOISE) -> Comparison:
    notes = environment_notes(old, new, force)
    old_cells = {_key(c): c for c in old["results"]}
    new_cells = {_key(c): c for c in new["results"]}
    gone = [k for k in old_cells if k not in new_cells]
    added = [k for k in new_cells if k not in old_cells]
    if gone:
        notes.append(f"note: {len(gone)} cell(s) only in the old run: {', '.join(_name(k) for k in gone[:5])}"
                     + (" ..." if len(gone) > 5 else ""))
    if added:
        notes.append(f"note: {len(added)} cell(s) only in the new run: {', '.join(_name(k) for k in added[:5])}"
                     + (" ..." if len(added) > 5 else ""))
    changes = []
    for key, cell in new_cells.items():
        if key in old_cells:
            changes += compare_cells(old_cells[key], cell, speedup_noise)
    return Comparison(notes, changes)
