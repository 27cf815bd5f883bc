"""OptimizeReport: what fvcompile did to each compiled graph, printable and JSON-serializable.

One `GraphReport` per graph Dynamo handed to the backend. Each records every hook call
(joint / post-grad, with the graph kind it saw) and, per pass, the sites rewritten, the
sites skipped with their reason and the time the pass took. A graph served from Inductor's
cache runs no pass: `cache_hit` says so instead of showing an empty list.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from fvcompile.passes.base import PassResult
from fvcompile.passes.graph_utils import op_delta


@dataclass
class PassRun:
    name: str
    hook: str  # a name of fvcompile.hooks.HOOKS
    graph_kind: str  # "joint", "inference", "forward", "backward"
    seconds: float
    result: PassResult
    ops_before: dict[str, int] = field(default_factory=dict)  # op name -> count in the graph (FX hooks)
    ops_after: dict[str, int] = field(default_factory=dict)

    def op_delta(self) -> dict[str, int]:
        """How many of each op the pass added (negative: removed)."""
        return op_delta(Counter(self.ops_before), Counter(self.ops_after))


@dataclass
class HookVisit:
    """One graph a hook was given (whether or not a pass of ours ran there)."""

    hook: str
    graph_kind: str
    num_nodes: int


@dataclass
class GraphReport:
    compile_id: str  # Dynamo's "frame/compile" id, e.g. "0/0"; "0/1" is a recompilation
    codegen: bool
    num_nodes: int
    recompile_reason: str = ""
    cache_hit: bool = False  # Inductor served the graph from its cache: no pass ran
    pass_runs: list[PassRun] = field(default_factory=list)
    hooks: list[HookVisit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    random_ops: list[str] = field(default_factory=list)  # random ops in Dynamo's graph (dropout, rand, ...)

    def rewritten(self, name: str | None = None) -> int:
        return sum(len(r.result.rewritten) for r in self.pass_runs if name in (None, r.name))


@dataclass
class OptimizeReport:
    passes: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)  # those of `passes` that change numerics by design
    graphs: list[GraphReport] = field(default_factory=list)
    graph_breaks: dict[str, int] = field(default_factory=dict)  # reason -> count
    ran_eagerly: str = ""  # why a call ran with no compiled graph (no pass could apply), at the first such call
    eager_calls: int = 0  # calls that ran no compiled graph
    graph_calls: int = 0  # calls of the compiled graphs

    @property
    def recompilations(self) -> list[GraphReport]:
        return [g for g in self.graphs if g.recompile_reason]

    def pass_runs(self, name: str | None = None) -> list[PassRun]:
        return [r for g in self.graphs for r in g.pass_runs if name in (None, r.name)]

    def rewritten(self, name: str | None = None) -> int:
        return sum(g.rewritten(name) for g in self.graphs)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        """One line per pass: what it did over all graphs (for the bench table)."""
        if self.ran_eagerly and not self.graphs:
            return f"ran eagerly: {self.ran_eagerly}"
        eager = f"; {self.eager_calls} call(s) ran eagerly: {self.ran_eagerly}" if self.eager_calls else ""
        if not self.passes:
            return "no passes" + eager
        if self.graphs and all(g.cache_hit for g in self.graphs):
            return "cache hit: no pass ran" + eager
        parts = []
        for name in self.passes:
            runs = self.pass_runs(name)
            done = sum(len(r.result.rewritten) for r in runs)
            skipped = sum(len(r.result.skipped) for r in runs)
            parts.append(f"{name}: {done} rewritten, {skipped} skipped")
        return "; ".join(parts) + eager

    def table(self):
        """A rich Table of every pass run."""
        from rich.table import Table

        table = Table(title=f"fvcompile report: passes {self.passes or '[]'}")
        for col in ("graph", "hook", "graph kind", "pass", "rewritten", "skipped (reason)", "ms"):
            table.add_column(col)
        for g in self.graphs:
            label = g.compile_id + (" (recompiled)" if g.recompile_reason else "")
            if g.cache_hit:
                table.add_row(label, "-", "-", "-", "-", "Inductor cache hit: no pass ran", "-")
                continue
            if not g.pass_runs:
                table.add_row(label, "-", "-", "-", "-", "no pass applies", "-")
            for r in g.pass_runs:
                skipped = "; ".join(f"{s.node}: {s.detail}" for s in r.result.skipped[:3])
                if len(r.result.skipped) > 3:
                    skipped += f"; ... ({len(r.result.skipped)} in all)"
                table.add_row(label, r.hook, r.graph_kind, r.name, str(len(r.result.rewritten)),
                              skipped, f"{r.seconds * 1e3:.1f}")
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=_NullFile())
        console.print(self.table())
        extra = [f"{self.eager_calls} call(s) ran eagerly: {self.ran_eagerly}"] if self.eager_calls else []
        for reason, count in self.graph_breaks.items():
            extra.append(f"graph break x{count}: {reason}")
        for g in self.recompilations:
            extra.append(f"recompilation {g.compile_id}: {g.recompile_reason}")
        return console.export_text() + "\n".join(extra)


class _NullFile:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass
