"""The suite's grid: which models, tasks and compile variants a run measures, and how.

A *variant* is one way to run a model: eager, stock Inductor (`torch.compile`), or fvcompile with
one pass set ("auto", or named passes). The grid is models x tasks x variants; each (model, task)
is measured as one group, every variant of it in the same process and interleaved, so that the
ratios between them (the speedups) share the machine's state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MODES = ("eager", "inductor", "fvcompile")
TASKS = ("infer", "train")
SIZES = ("tiny", "paper")
COLD_WAYS = ("process", "in-process")  # where a cold compile is measured (see fvcompile/bench/cold.py)


@dataclass(frozen=True)
class Variant:
    """One way to run a model. `passes`: "auto" or a tuple of pass names (fvcompile only);
    `ablation_of`: the pass set this variant leaves the pass `left_out` out of (per-pass attribution)."""

    mode: str
    passes: str | tuple[str, ...] = ()
    ablation_of: str = ""
    left_out: str = ""

    @property
    def label(self) -> str:
        """e.g. "eager", "inductor", "fvcompile[auto]", "fvcompile[sparse24+fp8_dense]", "fvcompile[none]"."""
        if self.mode != "fvcompile":
            return self.mode
        return f"fvcompile[{pass_set_label(self.passes)}]"

    def pass_argument(self):
        """What `fvcompile.optimize(passes=...)` takes for this variant."""
        return "auto" if self.passes == "auto" else list(self.passes)


def pass_set_label(passes) -> str:
    """A pass set in words: "auto", "none", or names joined by "+" (no commas: CSV-safe)."""
    if passes == "auto":
        return "auto"
    return "+".join(passes) or "none"


def pass_set_from_label(label: str):
    """The pass set a `pass_set_label` names: "auto", or a tuple of names ("none": no pass)."""
    return "auto" if label == "auto" else tuple(p for p in label.split("+") if p and p != "none")


@dataclass
class Settings:
    """How a run measures. Defaults are the full run's; `quick()` is the short one."""

    modes: tuple[str, ...] = MODES
    pass_sets: tuple = ("auto",)  # each: "auto" or a tuple of pass names
    rounds: int = 5  # interleaved rounds: each variant runs `iters` timed steps per round
    iters: int = 10
    warmup: int = 3  # untimed steps after the first (compiling) call
    batch_size: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    cold: str = "process"  # COLD_WAYS
    ablation: bool = True  # per-pass attribution where a pass set rewrote something
    cold_timeout_s: float = 1800.0

    @classmethod
    def quick(cls, **overrides) -> "Settings":
        """A short run for a laptop: fewer, shorter rounds, and cold compiles measured in this
        process (no fresh interpreter per variant)."""
        return replace(cls(rounds=3, iters=3, warmup=1, cold="in-process"), **overrides)

    def variants(self) -> list[Variant]:
        """The grid's variants for one (model, task), eager first (every other one's baseline, so
        measured even when not asked for), ablations aside (those depend on what the passes
        rewrote, known only once they ran)."""
        out = [Variant(m) for m in ("eager", "inductor") if m in self.modes or m == "eager"]
        if "fvcompile" in self.modes:
            out += [Variant("fvcompile", p) for p in dict.fromkeys(self.pass_sets)]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass_sets"] = [pass_set_label(p) for p in self.pass_sets]
        return d


def ablation_variants(full: Variant, applied: list[str], resolved: list[str]) -> list[Variant]:
    """For a pass set that rewrote something: the set with each applied pass left out, in the
    same run (`resolved`: the set's pass names, "auto" resolved on the device)."""
    label = pass_set_label(full.passes)
    return [Variant("fvcompile", tuple(p for p in resolved if p != gone), ablation_of=label, left_out=gone)
            for gone in applied]


def default_models(size: str) -> list[str]:
    """Every registered model of one size: "tiny" (the test configs) or "paper" (the rest)."""
    from fvcompile.models.registry import all_specs

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    return [s.name for s in all_specs() if s.tiny == (size == "tiny")]


def check_models(names) -> None:
    """Raise KeyError with one line listing the known models at the first unknown name."""
    from fvcompile.models.registry import get

    for name in names:
        get(name)


def check_pass_set(passes) -> None:
    """Raise ValueError with one line listing the known passes at the first unknown name."""
    import torch

    from fvcompile.passes import resolve_passes

    resolve_passes(passes if passes == "auto" else list(passes), torch.device("cpu"))


def resolved_names(passes, device: str) -> list[str]:
    """The pass names a set stands for on `device` ("auto" resolved)."""
    import torch

    from fvcompile.passes import resolve_passes

    if passes != "auto":
        return list(passes)
    return [p.name for p in resolve_passes("auto", torch.device(device))]
