"""Which collectives share a bucket: from the cost model, or from a plan by module name.

A bucket is a run of consecutive collectives of one kind, group and dtype (`Collective.bucket_key`)
that becomes one collective. Buckets trade latency for overlap and memory:

- one collective per bucket pays the latency once, instead of once per parameter;
- but a bucket is gathered as a whole, before its first parameter is used, and reduced only once
  its last gradient exists: a large bucket hides less behind compute and holds more memory.

`plan_by_cost` walks the collectives in order and adds the next module's collectives to the
current bucket while the cost model says the step gets no slower and the bucket stays within its
byte cap. `plan_by_modules` follows a plan given by module names, e.g.
`[["tok_embeddings", "layers.0"], ["layers.1"], ...]`, and refuses a name that matches nothing
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

def plan_by_cost(graph: fx.Graph, collectives: list[Collective], cost: CostModel, cap_bytes: int) -> list[Bucket]:
    """Buckets for every kind of collective in the graph (in graph order within each kind)."""
    node_s = _compute_before_each_node(graph, cost)
    buckets = []
    for _, same in _by_key(collectives):
        units = [list(u) for _, u in groupby(same, key=lambda c: c.module)]  # a module's parameters stay together
        buckets += _merge_units(units, node_s, cost, cap_bytes, gather=same[0].kind == "all_gather")
    return buckets


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
    """Greedy: merge the next unit into the current bucket when the estimated step time does not
    grow. A gather's communication hides behind the compute of the bucket before it (it is
    prefetched there); a reduction's behind the compute after it (it runs while later gradients
    are computed)."""
    # Each unit's compute window: from its anchor (a gather's first wait, a reduction's start) to the next unit's.
    anchors = [(u[0].wait if gather else u[-1].start) for u in units] + [None]
    window = [node_s[anchors[i + 1]] - node_s[anchors[i]] for i in range(len(units))]

    def comm(bucket_units):
        c = bucket_units[0][0]
        return cost.collective_s(c.kind, sum(x.bytes for u in bucket_units for x in u), c.group_size)

    buckets: list[list[Bucket]] = [[units[0]]]
    windows = [window[0]]
    for unit, w in zip(units[1:], window[1:]):
        current = buckets[-1]
        hide = windows[-2] if gather and len(buckets) > 1 else 0.0  # what hides the current gather
        size = sum(x.bytes for u in current + [unit] for x in u)
        # Apart, the host issues and waits on one more collective (an op's overhead).
        if gather:
            apart = max(hide, comm(current)) + max(windows[-1], comm([unit])) + w + cost.op_overhead_s
            together = max(hide, comm(current + [unit])) + windows[-1] + w
        else:
            apart = max(windows[-1], comm(current)) + max(w, comm([unit])) + cost.op_overhead_s
            together = windows[-1] + max(w, comm(current + [unit]))
        if size <= cap_bytes and together <= apart:
            current.append(unit)
            windows[-1] += w
        else:
            buckets.append([unit])
            windows.append(w)
    return [[c for u in b for c in u] for b in buckets]


def default_cap_bytes(collectives: list[Collective]) -> int:
    """Twice the largest repeated block (the collectives under `layers.3`, say: a module path up
    to its first index), or the largest collective where the model has no such blocks. With one
    bucket in use and one prefetched, at most four blocks' parameters are gathered at once."""
    blocks: dict[str, int] = {}
    for c in collectives:
        match = re.match(r"(.*?\.\d+)(\.|$)", c.module)
        key = match.group(1) if match else c.module
        blocks[key] = blocks.get(key, 0) + c.bytes
    repeated = [b for k, b in blocks.items() if re.search(r"\.\d+$", k)]
    return 2 * max(repeated) if repeated else max(c.bytes for c in collectives)


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
