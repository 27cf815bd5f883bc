"""fsdp_bucketing: a data-parallel graph's per-parameter collectives merged into buckets.

Each bucket becomes one collective on one flat buffer, exactly:

    all-gather:  shards --flatten, cat--> buffer --all_gather--> (ranks, numel) --slice, copy--> parameters
    reduction:   gradients --(ranks, numel_i), cat along dim 1--> buffer --reduce_scatter--> split --> shards
                 (all_reduce: flatten, cat, all_reduce, split)

A gather moves the same bytes to the same places, so a bucketed gather is bit-identical. A
bucketed reduction adds the same numbers, but a backend may add them in another order for
another buffer size (NCCL picks its algorithm and chunking by size), which is rounding-level
with more than two ranks; `bit_exact=True` leaves reductions per parameter, so that losses equal
the unbucketed run's exactly.

Which collectives share a bucket comes from `fsdp_plan` (the cost model, or `plan=` by module
name). The bucket's gather goes where its first member's was, its reduction where its last
member's was; `fsdp_reordering` then moves them to overlap compute. The bucket of each
collective is kept in the compile's store for that pass's report.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from fvcompile.passes import fsdp_collectives, fsdp_cost, fsdp_plan, fsdp_ranks, graph_utils
from fvcompile.passes.base import PassContext, PassResult, Site
from fvcompile.passes.fsdp_collectives import (ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, WAIT, Collective,
                                                CollectivePass, find_collectives)
from fvcompile.passes.fsdp_cost import CostModel
from fvcompile.passes.fsdp_plan import check_module_plan, plan_by_cost, plan_by_modules
from fvcompile.passes.fsdp_ranks import check_ranks_agree
from fvcompile.passes.graph_utils import call, repair_order

aten = torch.ops.aten
BUCKETS_KEY = "fsdp_buckets"  # ctx.store[BUCKETS_KEY][graph kind] = {start node name: bucket label}


class FSDPBucketing(CollectivePass):
    """Merge the per-parameter all-gathers and gradient reductions of FSDP into buckets.

    plan: "cost" (the cost model picks the buckets) or a list of buckets of module names, e.g.
        [["tok_embeddings", "layers.0"], ["layers.1"], ["layers.2", "norm", "output"]]; the
        parameters of modules the plan does not name keep one collective each.
    cost: a `CostModel` or a preset name ("cpu_gloo", "h100_nvlink", ...); None: the preset for
        the graph's device.
    bucket_cap_mb: the largest bucket (MiB of gathered parameters or of unreduced gradients);
        None: the model's largest block, or more while a bucket is latency-bound
        (`fsdp_plan.default_cap_bytes`, per kind).
    bit_exact: bucket only the gathers; reductions stay per parameter (see the module's docstring).
    """

    name = "fsdp_bucketing"
    hook = "post_grad"
    exact = True
    helpers = (fsdp_collectives, fsdp_cost, fsdp_plan, fsdp_ranks, graph_utils)

    def __init__(self, plan="cost", cost: CostModel | str | None = None, bucket_cap_mb: float | None = None,
                 bit_exact: bool = False):
        self.plan = plan if plan == "cost" else check_module_plan(plan)
        self.cost = CostModel.preset(cost) if isinstance(cost, str) else cost
        if bucket_cap_mb is not None and not (isinstance(bucket_cap_mb, (int, float)) and bucket_cap_mb > 0):
            raise ValueError(f"bucket_cap_mb takes a positive number of MiB (or None), got {bucket_cap_mb!r}")
        self.bucket_cap_mb = bucket_cap_mb
        self.bit_exact = bool(bit_exact)

    def options(self):
        cost = None if self.cost is None else {k: v for k, v in vars(self.cost).items()}
        return {"plan": self.plan, "cost": cost, "bucket_cap_mb": self.bucket_cap_mb, "bit_exact": self.bit_exact}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        collectives, skipped = find_collectives(graph)
        result = PassResult(skipped=skipped)
        if not collectives:
            return result
        if self.bit_exact:
            kept = [c for c in collectives if c.kind != "all_gather"]
            result.skipped += [Site(c.start.name, c.module, f"{c.kind} of {c.module or c.start.name} kept on its "
                                    "own: bit_exact=True", kind=c.kind, reason="bit_exact") for c in kept]
            collectives = [c for c in collectives if c.kind == "all_gather"]
        buckets = self._buckets(graph, collectives, ctx, result)
        labels = ctx.store.setdefault(BUCKETS_KEY, {}).setdefault(ctx.graph_kind, {})
        counters: dict[str, int] = {}
        for bucket in buckets:
            kind = bucket[0].kind
            counters[kind] = counters.get(kind, 0) + 1
            label = f"{kind} bucket {counters[kind]}: {_modules(bucket)} ({len(bucket)} tensors, " \
                    f"{sum(c.bytes for c in bucket) / 2**20:.3g} MiB)"
            start = bucket_all_gathers(graph, bucket) if kind == "all_gather" else bucket_reductions(graph, bucket)
            labels[start.name] = label
            if len(bucket) > 1:
                result.rewritten.append(Site(start.name, _modules(bucket), f"{label}: one {kind} instead of "
                                             f"{len(bucket)}", kind=kind, ops={str(bucket[0].start.target): 1 - len(bucket)}))
        repair_order(graph)
        graph.eliminate_dead_code()
        check_ranks_agree(graph, ctx, self.name)
        return result

    def _buckets(self, graph, collectives, ctx, result) -> list[list[Collective]]:
        if self.plan == "cost":
            cost = self.cost or CostModel.for_device(ctx.device)
            cap = int(self.bucket_cap_mb * 2**20) if self.bucket_cap_mb else None
            limit = f"{self.bucket_cap_mb:.3g} MiB" if cap else "one block, or more while latency-bound"
            result.notes.append(f"buckets planned by the cost model ({cost.describe()}), at most {limit} each")
            return plan_by_cost(graph, collectives, cost, cap)
        buckets, unplanned = plan_by_modules(collectives, self.plan)
        result.skipped += [Site(c.start.name, c.module, f"{c.kind} of {c.module or c.start.name} kept on its own: "
                                "the plan does not name its module", kind=c.kind, reason="not_in_plan")
                           for c in unplanned]
        return buckets


def _modules(bucket: list[Collective]) -> str:
    names = list(dict.fromkeys(c.module or c.start.name for c in bucket))
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"


def _flat(graph: fx.Graph, x: fx.Node, shape) -> fx.Node:
    if not x.meta["val"].is_contiguous():
        x = call(graph, aten.clone.default, x, memory_format=torch.contiguous_format)
    return call(graph, aten.view.default, x, shape)


def _move_chain_before(x: fx.Node, anchor: fx.Node) -> None:
    """Move x and the ops it is computed from (parameter-only ops: casts, pads, views) before anchor."""
    chain = []
    while x.op == "call_function":
        chain.append(x)
        x = x.all_input_nodes[0]
    for node in reversed(chain):
        anchor.prepend(node)


def bucket_all_gathers(graph: fx.Graph, bucket: list[Collective]) -> fx.Node:
    """One all-gather for the bucket, where its first member's was; each member's result is a
    copy out of the gathered buffer, where that member's wait was. Returns the new start node."""
    first = bucket[0].start
    for c in bucket:
        _move_chain_before(c.input, first)
    ranks, group = bucket[0].group_size, bucket[0].group
    with graph.inserting_before(first):
        flats = [_flat(graph, c.input, [-1]) for c in bucket]
        buffer = call(graph, aten.cat.default, flats) if len(flats) > 1 else flats[0]
        start = call(graph, ALL_GATHER, buffer, ranks, group)
        wait = call(graph, WAIT, start)
        rows = call(graph, aten.view.default, wait, [ranks, buffer.meta["val"].numel()])
    offset = 0
    for c in bucket:
        numel = c.input_numel
        with graph.inserting_before(c.wait):
            piece = call(graph, aten.slice.Tensor, rows, 1, offset, offset + numel)
            piece = call(graph, aten.clone.default, piece, memory_format=torch.contiguous_format)
            out = call(graph, aten.view.default, piece, list(c.wait.meta["val"].shape))
        offset += numel
        _replace(graph, c, out)
    return start


def bucket_reductions(graph: fx.Graph, bucket: list[Collective]) -> fx.Node:
    """One reduce-scatter (or all-reduce) for the bucket, where its last member's was (every
    gradient exists there); each member's result is a slice of the reduced buffer."""
    last = bucket[-1].start  # buckets keep graph order
    ranks, group, op = bucket[0].group_size, bucket[0].group, bucket[0].reduce_op
    scatter = bucket[0].kind == "reduce_scatter"
    with graph.inserting_before(last):
        if scatter:  # rank r's part of every gradient, side by side: row r of (ranks, total numel)
            rows = [_flat(graph, c.input, [ranks, c.input_numel // ranks]) for c in bucket]
            buffer = call(graph, aten.cat.default, rows, 1) if len(rows) > 1 else rows[0]
            buffer = call(graph, aten.view.default, buffer, [-1])
            start = call(graph, REDUCE_SCATTER, buffer, op, ranks, group)
        else:
            flats = [_flat(graph, c.input, [-1]) for c in bucket]
            buffer = call(graph, aten.cat.default, flats) if len(flats) > 1 else flats[0]
            start = call(graph, ALL_REDUCE, buffer, op, group)
        wait = call(graph, WAIT, start)
        sizes = [c.wait.meta["val"].numel() for c in bucket]
        pieces = call(graph, aten.split_with_sizes.default, wait, sizes)
        for i, c in enumerate(bucket):
            piece = graph.call_function(operator.getitem, (pieces, i))
            piece.meta["val"] = pieces.meta["val"][i]
            _replace(graph, c, call(graph, aten.view.default, piece, list(c.wait.meta["val"].shape)))
    return start


def _replace(graph: fx.Graph, c: Collective, new: fx.Node) -> None:
    new.meta.setdefault("nn_module_stack", c.start.meta.get("nn_module_stack") or {})
    c.wait.replace_all_uses_with(new)
    graph.erase_node(c.wait)
    graph.erase_node(c.start)
