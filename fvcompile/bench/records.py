"""One cell of the grid, as measured: the row of the JSON, CSV and markdown outputs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# A cell's status: it passes as "ok" or "approximate" (an approximate pass rewrote it; see
# fvcompile/bench/check.py); anything else is why it failed.
PASSING = ("ok", "approximate")
FAILURES = ("mismatch", "compile_error", "runtime_error", "oom", "timeout", "skipped")


@dataclass
class CellResult:
    model: str
    task: str  # "infer" or "train"
    variant: str  # Variant.label: "eager", "inductor", "fvcompile[auto]", ...
    mode: str  # "eager", "inductor" or "fvcompile"
    passes: str = ""  # the pass set (pass_set_label), fvcompile only
    ablation_of: str = ""  # the pass set this variant leaves one pass out of (per-pass attribution)
    left_out: str = ""  # the pass it leaves out
    status: str = "ok"  # "ok", "approximate" or one of FAILURES
    reason: str = ""  # why it failed, or what to know about a passing cell
    error: float | None = None  # largest relative L2 error against eager
    # Time per step: the median of each interleaved round, in ms, and their median.
    round_ms: list[float] = field(default_factory=list)
    median_ms: float | None = None
    # Speedups: the median of the per-round ratios, and their quartiles (the spread).
    speedup: float | None = None  # eager / this
    speedup_lo: float | None = None
    speedup_hi: float | None = None
    speedup_vs_inductor: float | None = None  # inductor / this
    speedup_vs_inductor_lo: float | None = None
    speedup_vs_inductor_hi: float | None = None
    # Compile time: first call minus a steady step, in a fresh cache (cold) and in the cache
    # the cold compile filled (warm); cold_in: "process" (a fresh interpreter) or "in-process".
    compile_cold_s: float | None = None
    compile_warm_s: float | None = None
    cold_in: str = ""
    peak_mb: float | None = None  # one step's peak memory beyond what was allocated before it
    memory_ratio: float | None = None  # peak_mb / eager's
    graph_breaks: int | None = None  # distinct graph breaks
    recompilations: int | None = None
    recompile_reasons: list[str] = field(default_factory=list)
    rewritten: dict[str, int] = field(default_factory=dict)  # pass -> sites rewritten
    pass_summary: str = ""  # the OptimizeReport's one-line summary

    def fail(self, status: str, reason: str) -> "CellResult":
        self.status, self.reason = status, reason
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def one_line(exc: BaseException) -> str:
    """An exception in one line, its cause where Dynamo wrapped it (BackendCompilerFailed)."""
    cause = getattr(exc, "inner_exception", None) or exc
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text[:300]}"


def failure_status(exc: BaseException, stage: str) -> str:
    """"oom" for an out-of-memory error, else "<stage>_error"."""
    cause = getattr(exc, "inner_exception", None) or exc
    if isinstance(cause, torch_oom_errors()) or "out of memory" in str(cause).lower():
        return "oom"
    return f"{stage}_error"


def torch_oom_errors() -> tuple:
    import torch

    return (torch.cuda.OutOfMemoryError, MemoryError)
