"""Which collectives share a bucket: from the cost model, or from a plan by module name.

A bucket is a run of consecutive collectives of one kind, group and dtype (`Collective.bucket_key`)
that becomes one collective. Buckets trade latency for overlap and memory:

- one collective per bucket pays the latency once, instead of once per parameter;
- but a bucket is gathered as a whole, before its first parameter is used, and reduced only once
  its last gradient exists: a large bucket hides less behind compute and holds more memory.

`plan_by_cost` walks the collectives in order and adds the next block's collectives (a module's,
where a block outgrows the cap) to the current bucket while the cost model says the step gets no
slower and the bucket stays within its byte cap. `plan_by_modules` follows a plan given by module
names, e.g. `[["tok_embeddings", "layers.0"], ["layers.1"], ...]`, and refuses a name that matches nothing
or a plan that splits a module's parameters between buckets.
"""
from __future__ import annotations

import re
from itertools import groupby

from torch import fx

from fvcompile.passes.fsdp_collectives import Collective
from fvcompile.passes.fsdp_cost import CostModel

Bucket = list[Collective]


# ---- the cost model's plan -----------------------------------------------------------------

def plan_by_cost(graph: fx.Graph, collectives: list[Collective], cost: CostModel,
                 cap_bytes: int | None = None) -> list[Bucket]:
    """Buckets for every kind of collective in the graph (in graph order within each kind), each
    at most `cap_bytes` (None: `default_cap_bytes` of that kind's collectives)."""
    node_s = _compute_before_each_node(graph, cost)
    buckets = []
    for _, same in _by_key(collectives):
        cap = cap_bytes or default_cap_bytes(same, cost)
        units = _units(same, cap)
        buckets += _merge_units(units, node_s, cost, cap, gather=same[0].kind == "all_gather")
    return buckets


def _units(collectives: list[Collective], cap_bytes: int) -> list[Bucket]:
    """Whole blocks where a block fits the cap, so that buckets start where blocks start (as
    FSDP2's do; a bucket starting mid-block could not take the next block within a one-block
    cap), else modules: a module's parameters always stay together."""
    units = []
    for _, block in groupby(collectives, key=lambda c: _block_of(c.module)):
        block = list(block)
        if sum(c.bytes for c in block) <= cap_bytes:
            units.append(block)
        else:
            units += [list(m) for _, m in groupby(block, key=lambda c: c.module)]
    return units


def _block_of(module: str) -> str:
    """A module path up to its first index (`layers.3.attention.wq` -> `layers.3`); the path
    itself where it has no index (`tok_embeddings`)."""
    match = re.match(r"(.*?\.\d+)(\.|$)", module)
    return match.group(1) if match else module


def _by_key(collectives: list[Collective]):
    keys = {}
    for c in collectives:
        keys.setdefault(c.bucket_key, []).append(c)
    return keys.items()


def _compute_before_each_node(graph: fx.Graph, cost: CostModel) -> dict[fx.Node, float]:
    """The compute time from the graph's start up to each node (a prefix sum of `cost.node_s`)."""
    total, before = 0.0, {}
    for node in graph.nodes:
        before[node] = total
        total += cost.node_s(node)
    before[None] = total  # the graph's end
    return before


def _merge_units(units: list[Bucket], node_s: dict, cost: CostModel, cap_bytes: int, gather: bool) -> list[Bucket]:
    """Greedy: add the next unit to the current bucket unless that makes the step, simulated up
    to that unit on a compute and a communication stream, take longer (or the bucket outgrow its
    cap). Ties merge: one collective fewer for the host to issue."""
    anchors = [(u[0].wait if gather else u[-1].start) for u in units] + [None]
    # Each unit's compute: from its anchor (a gather's first wait, a reduction's start) to the next unit's.
    window = [node_s[anchors[i + 1]] - node_s[anchors[i]] for i in range(len(units))]
    step_s = _gathers_step_s if gather else _reductions_step_s

    def comm(bucket):  # bucket: indices of units
        first = units[bucket[0]][0]
        nbytes = sum(c.bytes for i in bucket for c in units[i])
        return cost.collective_s(first.kind, nbytes, first.group_size) + cost.op_overhead_s

    buckets: list[list[int]] = [[0]]
    for u in range(1, len(units)):
        size = sum(c.bytes for i in buckets[-1] + [u] for c in units[i])
        merged = buckets[:-1] + [buckets[-1] + [u]]
        apart = step_s(buckets + [[u]], window, comm)
        if size <= cap_bytes and step_s(merged, window, comm) <= apart * (1 + 1e-9):  # a tie up to rounding
            buckets[-1].append(u)
        else:
            buckets.append([u])
    return [[c for i in b for c in units[i]] for b in buckets]


def _gathers_step_s(buckets: list[list[int]], window: list[float], comm) -> float:
    """Time to compute through the buckets when each bucket's gather is issued as the previous
    bucket's compute starts (one bucket ahead) and the gathers queue on one stream."""
    comm_end = compute_start = compute_end = 0.0
    for b in buckets:
        comm_start = max(compute_start, comm_end)
        comm_end = comm_start + comm(b)
        compute_start = max(compute_end, comm_end)
        compute_end = compute_start + sum(window[i] for i in b)
    return compute_end


def _reductions_step_s(buckets: list[list[int]], window: list[float], comm) -> float:
    """Time to compute through the buckets when each bucket's reduction is issued once its last
    gradient exists, queues on one stream, and is waited on before the next one is issued. The
    last reduction's own time is left out: what follows the units compared hides it."""
    clock = comm_free = 0.0
    for b in buckets:
        clock += sum(window[i] for i in b[:-1])  # the gradients of the bucket's other units
        clock = max(clock, comm_free)  # the previous reduction's wait
        comm_free = clock + comm(b)
        clock += window[b[-1]]
    return clock


def default_cap_bytes(collectives: list[Collective], cost: CostModel) -> int:
    """One repeated block (the collectives under `layers.3`, say: a module path up to its first
    index; the largest collective where the model has no such blocks), or more while a bucket
    is latency-bound: below 4 x latency x bandwidth, a collective's time is mostly its latency.
    Large models get FSDP2's per-block buckets and memory; small ones (or slow networks) fewer,
    larger collectives."""
    blocks: dict[str, int] = {}
    for c in collectives:
        key = _block_of(c.module)
        blocks[key] = blocks.get(key, 0) + c.bytes
    repeated = [b for k, b in blocks.items() if re.search(r"\.\d+$", k)]
    block = max(repeated) if repeated else max(c.bytes for c in collectives)
    return max(block, int(4 * cost.latency_s * cost.bandwidth))


# ---- a plan by module name ------------------------------------------------------------------

def check_module_plan(plan) -> list[list[str]]:
    """A plan as a list of buckets of module names ("layers.0" alone is a bucket of its own)."""
    if not isinstance(plan, (list, tuple)) or not plan:
        raise TypeError(f"a bucket plan is a non-empty list of buckets, each a module name or a list of "
                        f"module names, e.g. [['tok_embeddings', 'layers.0'], ['layers.1']]; got {plan!r}")
    buckets = [[b] if isinstance(b, str) else list(b) for b in plan]
    names = [n for b in buckets for n in b]
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"bucket plan entries must be module names (non-empty strings); got {plan!r}")
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a == b:
                raise ValueError(f"the bucket plan names module {a!r} twice: name each module once")
            if _inside(a, b) or _inside(b, a):
                outer, inner = (a, b) if _inside(b, a) else (b, a)
                same = any(outer in bucket and inner in bucket for bucket in buckets)
                raise ValueError(f"the bucket plan names {inner!r} inside {outer!r}"
                                 + ("" if same else ", in another bucket: that splits the parameters of "
                                    f"{outer!r} between buckets") + f"; name {outer!r} alone, or its "
                                 "submodules without it")
    return buckets


def _inside(module: str, outer: str) -> bool:
    return outer == "" or module == outer or module.startswith(outer + ".")


def plan_by_modules(collectives: list[Collective], plan: list[list[str]]) -> tuple[list[Bucket], list[Collective]]:
    """Buckets as the plan says (each split by kind, group and dtype), and the collectives of
    modules the plan does not name. A name that matches no collective is an error naming it."""
    modules = sorted({c.module for c in collectives})
    buckets, claimed = [], set()
    for names in plan:
        for name in names:
            if not any(_inside(m, name) for m in modules):
                shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
                raise ValueError(f"the bucket plan names {name!r}, which holds no parameter this graph gathers or "
                                 f"reduces; the modules with parameters here are: {shown}")
        members = [c for c in collectives if any(_inside(c.module, n) for n in names)]
        claimed.update(id(c) for c in members)
        buckets += [b for _, b in _by_key(members)]
    return buckets, [c for c in collectives if id(c) not in claimed]
