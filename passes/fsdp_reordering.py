"""fsdp_reordering: a data-parallel graph's collectives moved to overlap its compute.

A functional collective starts where its node is and is waited on where its wait is; what the
graph computes in between runs while the data moves. FSDP traces each all-gather right before
its parameters' first use and each wait right after, so nothing overlaps. This pass moves:

- each all-gather's start up to the wait of the gather before it (prefetch: bucket i+1 moves
  while bucket i computes), and the first one to where its input exists;
- each reduction's wait down to the start of a later reduction on the same group (the gradients
  of the next bucket are computed while this one is reduced), or to the graph's end for the last.

How far ahead is bounded by memory: a prefetched gather holds its gathered parameters, and a
reduction in flight its unreduced gradients, while other buckets' are alive. Each moves one
bucket ahead (FSDP2's default prefetch), or as far as an explicit budget of MiB allows; and by
default a move that would raise the graph's peak memory (`fsdp_timeline.memory_walk`: saved
activations and gradient shards included) is undone: near the peak a gather waits for its use,
everywhere else it overlaps. Only node order changes: the pass is exact.

Two Inductor options are turned off for the graphs the pass compiles (`config_patches`), both
seen in the generated code. `reorder_for_peak_memory` moves each prefetched gather back next to
its wait, undoing the prefetch (Inductor's `control_deps` could pin single edges instead; it is
internal and newer). `allow_buffer_reuse` keeps a dead buffer alive until a later allocation of
the same size takes it over; a block's gathered flat buffer and the next block's flat gradient
buffer have the same size, so one extra block stayed alive through each block's backward; freed
at their last use, buffers live as long as the liveness walk the pass plans with says.

The report has one site per collective: its
bucket (from `fsdp_bucketing`, when it ran first), the compute it overlaps, or that it is exposed
and why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fvcompile.passes import fsdp_collectives, fsdp_cost, fsdp_ranks, fsdp_timeline, graph_utils
from fvcompile.passes.base import PassContext, PassResult, Site
from fvcompile.passes.fsdp_bucketing import BUCKETS_KEY
from fvcompile.passes.fsdp_collectives import Collective, CollectivePass, find_collectives
from fvcompile.passes.fsdp_cost import CostModel
from fvcompile.passes.fsdp_ranks import check_ranks_agree
from fvcompile.passes.graph_utils import repair_order


@dataclass
class Overlap:
    """What one collective overlaps once moved."""

    collective: Collective
    compute_nodes: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_reason: str = ""  # a snake_case code when nothing overlaps
    why: str = ""


class FSDPReordering(CollectivePass):
    """Prefetch the FSDP all-gathers and delay the reduction waits, within a memory budget.

    memory_budget_mb: how many MiB of prefetched parameters (or of gradients in flight) may be
        alive beyond the bucket in use; None: one bucket ahead, whatever its size.
    keep_peak: undo each move that would raise the graph's peak memory (False: FSDP2's
        behaviour, every move made whatever the peak).
    cost: a `CostModel` or preset name, for the report's estimates only (None: the device's preset).
    """

    name = "fsdp_reordering"
    hook = "post_grad"
    exact = True
    helpers = (fsdp_collectives, fsdp_cost, fsdp_ranks, fsdp_timeline, graph_utils)

    def __init__(self, memory_budget_mb: float | None = None, cost: CostModel | str | None = None,
                 keep_peak: bool = True):
        if memory_budget_mb is not None and not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb >= 0):
            raise ValueError(f"memory_budget_mb takes a number of MiB >= 0 (or None), got {memory_budget_mb!r}")
        self.memory_budget_mb = memory_budget_mb
        self.keep_peak = keep_peak
        self.cost = CostModel.preset(cost) if isinstance(cost, str) else cost

    def options(self):
        return {"memory_budget_mb": self.memory_budget_mb, "keep_peak": self.keep_peak}

    def config_patches(self):
        return {"reorder_for_peak_memory": False, "allow_buffer_reuse": False}  # module docstring

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        collectives, skipped = find_collectives(graph)
        if not collectives:
            return PassResult(skipped=skipped)
        budget = None if self.memory_budget_mb is None else self.memory_budget_mb * 2**20
        gathers = [c for c in collectives if c.kind == "all_gather"]
        reductions = [c for c in collectives if c.kind != "all_gather"]
        guard = PeakGuard(graph, ctx.graph_kind) if self.keep_peak else Unguarded()
        _prefetch(graph, gathers, budget, guard)
        for same in _by_group(reductions):  # hybrid: the reduce-scatters, then the all-reduces of their results
            _delay_waits(graph, same, budget, guard)
        repair_order(graph)
        overlaps = _overlaps(graph, collectives, self.cost or CostModel.for_device(ctx.device), budget, guard.refused)
        check_ranks_agree(graph, ctx, self.name)
        return _report(overlaps, ctx, skipped)


class PeakGuard:
    """Undoes the moves that raise a graph's peak memory above what it was before the pass.

    The peak is `fsdp_timeline.memory_walk`'s: values alive from the node that makes them to
    their last use, in graph order, and the graph's outputs to its end (the forward's saved
    activations, the backward's gradient shards, which pile up as it runs); a backward graph
    also holds the activations saved for it (its inputs other than the parameters, `primals_*`)."""

    def __init__(self, graph: fx.Graph, graph_kind: str):
        self.graph = graph
        saved = fsdp_timeline.saved_activations(graph) if graph_kind == "backward" else []
        self.walk = lambda: fsdp_timeline.memory_walk(graph, counted_inputs=saved).peak_bytes
        self.peak = self.walk()
        self.refused: dict[fx.Node, str] = {}  # a collective's start -> why its move was undone

    def move(self, c: Collective, do) -> bool:
        """Run `do()` (which moves nodes); undo it if the peak rose. Returns whether it stayed."""
        before = list(self.graph.nodes)
        do()
        peak = self.walk()
        if peak <= self.peak:
            return True
        anchor = before[0]
        for node in before[1:]:  # the old order back
            if node.prev is not anchor:
                anchor.append(node)
            anchor = node
        self.refused[c.start] = (f"moving it would raise the graph's peak memory from {self.peak / 2**20:.4g} "
                                 f"to {peak / 2**20:.4g} MiB")
        return False


class Unguarded:
    """`keep_peak=False`: every move is made."""

    def __init__(self):
        self.refused: dict[fx.Node, str] = {}  # none

    def move(self, c: Collective, do) -> bool:
        do()
        return True


def _prefetch(graph: fx.Graph, gathers: list[Collective], budget: float | None, guard: PeakGuard | Unguarded) -> None:
    """Move each gather's start (and the ops making its input) up to the wait of the gather one
    bucket before it, or further back while the prefetched bytes fit the budget; the first one
    to the graph's top; each undone where it would raise the peak (`guard`)."""
    top = list(graph.find_nodes(op="placeholder"))[-1]  # a gather's input is a parameter: there is one
    for i, c in enumerate(gathers):
        ahead = _buckets_ahead(gathers, i, budget)
        if i > 0 and ahead == 0:
            continue  # over budget: it stays right before its use

        def move(c=c, anchor=top if i == 0 else gathers[i - ahead].wait):
            for node in _input_chain(c.start):
                anchor.append(node)
                anchor = node
        guard.move(c, move)


def _buckets_ahead(gathers: list[Collective], i: int, budget: float | None) -> int:
    """How many buckets ahead of its use gather i may start: 1 without a budget; with one, as
    many as keep the prefetched parameters (this bucket's and those of the buckets it passes
    that are prefetched too) within it."""
    if budget is None:
        return min(i, 1)
    ahead, held = 0, 0
    while ahead < i and held + gathers[i - ahead].bytes <= budget:
        held += gathers[i - ahead].bytes
        ahead += 1
    return ahead


def _input_chain(start: fx.Node) -> list[fx.Node]:
    """The start node and the ops computing its input from parameters, inputs first (the flat
    buffer of a bucket: views, a cat, casts)."""
    chain, todo, seen = [], [start], set()
    while todo:
        node = todo.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        chain.append(node)
        todo += node.all_input_nodes
    order = {n: i for i, n in enumerate(start.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _delay_waits(graph: fx.Graph, reductions: list[Collective], budget: float | None,
                 guard: PeakGuard | Unguarded) -> None:
    """Move each reduction's wait down to a later reduction's start (the next one, or further
    while the gradients in flight fit the budget); the last ones to before their first use;
    each undone where it would raise the peak (`guard`)."""
    for i, c in enumerate(reductions):
        later = i + 1
        if budget is not None:
            held = c.bytes
            while later + 1 < len(reductions) and held + reductions[later].bytes <= budget:
                held += reductions[later].bytes
                later += 1
        if later < len(reductions):
            to = reductions[later].start
        else:
            to = min(c.wait.users, key=_order(graph).__getitem__)
        guard.move(c, lambda: to.prepend(c.wait))


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _overlaps(graph: fx.Graph, collectives: list[Collective], cost: CostModel, budget, refused: dict) -> list[Overlap]:
    order = _order(graph)
    nodes = list(graph.nodes)
    out = []
    for c in collectives:
        between = [n for n in nodes[order[c.start] + 1:order[c.wait]] if cost.node_s(n) > 0]
        o = Overlap(c, len(between), sum(cost.node_s(n) for n in between),
                    cost.collective_s(c.kind, c.bytes, c.group_size))
        if not between:
            o.exposed_reason, o.why = ("peak_memory", refused[c.start]) if c.start in refused else _why_exposed(c, collectives, budget)
        elif o.compute_s < o.comm_s:
            o.exposed_reason = "partly_exposed"
            o.why = (f"its estimated {o.comm_s * 1e3:.3g} ms of communication outlasts the "
                     f"{o.compute_s * 1e3:.3g} ms of compute it overlaps")
        out.append(o)
    return out


def _by_group(collectives: list[Collective]) -> list[list[Collective]]:
    """The collectives split by kind and process group, each list in graph order."""
    groups: dict[tuple, list[Collective]] = {}
    for c in collectives:
        groups.setdefault((c.kind, c.group), []).append(c)
    return list(groups.values())


def _why_exposed(c: Collective, collectives: list[Collective], budget) -> tuple[str, str]:
    same = next(g for g in _by_group(collectives) if c in g)
    if c.kind == "all_gather" and c is same[0]:
        return "first", "the graph's first gather: nothing is computed before its parameters are used"
    if c.kind != "all_gather" and c is same[-1]:
        return "last", "the graph's last reduction: nothing is left to compute after its gradients"
    if budget is not None:
        return "memory_budget", f"prefetching it would exceed the memory budget of {budget / 2**20:.3g} MiB"
    return "no_compute_between", "no compute lies between it and its use"


def _report(overlaps: list[Overlap], ctx: PassContext, skipped: list[Site]) -> PassResult:
    labels = ctx.store.get(BUCKETS_KEY, {}).get(ctx.graph_kind, {})
    result = PassResult(skipped=list(skipped))
    for o in overlaps:
        c = o.collective
        bucket = labels.get(c.start.name, f"{c.kind} of {c.module or c.start.name} (unbucketed)")
        if o.exposed_reason in ("", "partly_exposed"):
            detail = (f"{bucket}: overlaps {o.compute_nodes} compute ops (~{o.compute_s * 1e3:.3g} ms estimated, "
                      f"communication ~{o.comm_s * 1e3:.3g} ms)" + (f"; partly exposed: {o.why}" if o.why else ""))
            result.rewritten.append(Site(c.start.name, c.module, detail, kind=c.kind, reason=o.exposed_reason))
        else:
            result.skipped.append(Site(c.start.name, c.module, f"{bucket}: exposed: {o.why}", kind=c.kind,
                                       reason=o.exposed_reason))
    return result
