"""The collectives of a data-parallel graph, as the FSDP passes see them.

`simple_fsdp` (and any FSDP written with functional collectives) leaves, in the post-grad graph,
one collective per parameter:

    forward / backward:  shard -> [cast] -> all_gather_into_tensor -> wait_tensor -> compute
    backward:            gradient -> reduce_scatter_tensor | all_reduce -> wait_tensor -> [cast] -> output

`find_collectives` returns each as a `Collective` (its start and wait nodes, its group, dtype,
size and module), in graph order, and the collectives it leaves alone with the reason: a
gather of something that is not a parameter (tensor parallelism gathers activations), a
reduction whose result the graph computes with. `signature` is the sequence of collectives a
graph will issue, which every rank must agree on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fvcompile.passes.base import GraphPass, PassContext, Site
from fvcompile.passes.graph_utils import CASTS, module_path

c10d = torch.ops._c10d_functional
ALL_GATHER = c10d.all_gather_into_tensor.default
REDUCE_SCATTER = c10d.reduce_scatter_tensor.default
ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default
KINDS = {ALL_GATHER: "all_gather", REDUCE_SCATTER: "reduce_scatter", ALL_REDUCE: "all_reduce"}


@dataclass
class Collective:
    """One collective of a graph: its start (the functional op) and the wait on its result."""

    start: fx.Node
    wait: fx.Node
    kind: str  # "all_gather", "reduce_scatter" or "all_reduce"
    group: str  # the process group's name
    group_size: int
    reduce_op: str  # "sum", "avg", ... ("" for a gather)
    dtype: torch.dtype
    module: str  # the module whose parameter it moves ("" when the graph does not say)

    @property
    def input(self) -> fx.Node:
        return self.start.args[0]

    @property
    def input_numel(self) -> int:
        return self.input.meta["val"].numel()

    @property
    def bytes(self) -> int:
        """What the collective moves: the gathered (all-gather) or the unreduced (reduce) tensor."""
        val = self.wait.meta["val"] if self.kind == "all_gather" else self.input.meta["val"]
        return val.numel() * val.element_size()

    @property
    def bucket_key(self) -> tuple:
        """Collectives can share a bucket only when these agree."""
        return (self.kind, self.group, self.group_size, self.reduce_op, self.dtype)


def _group_args(node: fx.Node) -> tuple[str, int, str]:
    """(group name, group size, reduce op) of a functional collective node."""
    if node.target == ALL_GATHER:  # (input, group_size, group_name)
        return node.args[2], node.args[1], ""
    if node.target == REDUCE_SCATTER:  # (input, reduce_op, group_size, group_name)
        return node.args[3], node.args[2], node.args[1]
    # all_reduce(input, reduce_op, group_name): the group's size is not an argument
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return node.args[2], dist.get_world_size(_resolve_process_group(node.args[2])), node.args[1]


# Ops that move or convert data without computing: what lies between a parameter shard and its
# gather (a cast for mixed precision, a pad for uneven shards, a bucket's flatten and cat).
DATA_MOVEMENT = {torch.ops.aten.cat.default, torch.ops.aten.constant_pad_nd.default, *CASTS}


def _from_parameters_only(node: fx.Node) -> bool:
    """Whether `node` is computed from graph inputs by data movement alone: a sharded parameter
    (or a bucket of them), not an activation."""
    todo = [node]
    while todo:
        cur = todo.pop()
        if cur.op == "placeholder":
            continue
        if cur.op != "call_function" or not (cur.target in DATA_MOVEMENT or getattr(cur.target, "is_view", False)):
            return False
        todo += cur.all_input_nodes
    return True


def _only_reaches_output(node: fx.Node) -> bool:
    """Whether `node`'s value goes only to the graph's outputs, through casts, views, a bucket's
    cat and further collectives (a gradient, reduced and returned), not into computation."""
    todo, seen = [node], set()
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user.op == "output" or user in seen:
                continue
            moves_data = user.target in DATA_MOVEMENT or getattr(user.target, "is_view", False)
            if len(user.all_input_nodes) != 1 and user.target not in KINDS and not moves_data:
                return False  # computed with: e.g. added to an activation
            seen.add(user)
            todo.append(user)
    return True


def find_collectives(graph: fx.Graph) -> tuple[list[Collective], list[Site]]:
    """The graph's parameter all-gathers and gradient reductions, in graph order, and the
    collectives left alone (as skipped sites, with the reason)."""
    found, skipped = [], []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in KINDS:
            continue
        waits = [u for u in node.users if u.target == WAIT]
        kind = KINDS[node.target]
        if len(waits) != 1 or len(node.users) != 1:
            skipped.append(Site(node.name, module_path(node), f"{kind} {node.name} is not waited on exactly once",
                                kind=kind, reason="unusual_wait"))
            continue
        wait = waits[0]
        if kind == "all_gather" and not _from_parameters_only(node.args[0]):
            skipped.append(Site(node.name, module_path(node), f"{node.name} gathers a computed tensor, not a "
                                "parameter shard (e.g. tensor parallelism): left as it is", kind=kind,
                                reason="not_a_parameter"))
            continue
        if kind != "all_gather" and not _only_reaches_output(wait):
            skipped.append(Site(node.name, module_path(node), f"the graph computes with {node.name}'s result: "
                                "not a gradient reduction, left as it is", kind=kind, reason="not_a_gradient"))
            continue
        group, size, op = _group_args(node)
        found.append(Collective(node, wait, kind, group, size, op, node.args[0].meta["val"].dtype,
                                module_path(node)))
    return found, skipped


def may_hold_collectives(gm: fx.GraphModule, example_inputs) -> bool:
    """Whether a Dynamo graph can hold collectives once AOTAutograd traces it: it takes
    distributed tensors (DTensor parameters) or calls a functional collective itself."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(x, DTensor) for x in example_inputs):
        return True
    return any(n.op == "call_function" and _is_collective_call(n.target) for n in gm.graph.nodes)


def _is_collective_call(target) -> bool:
    name = f"{getattr(target, '__module__', '')}.{target}"
    return "_c10d_functional" in name or "functional_collectives" in name


class CollectivePass(GraphPass):
    """A pass over a graph's collectives: installed only for Dynamo graphs that can hold them,
    run only on the forward / backward graphs that do."""

    def wanted(self, gm: fx.GraphModule, example_inputs) -> bool:
        return may_hold_collectives(gm, example_inputs)

    def applies_to(self, ctx: PassContext) -> bool:
        return bool(ctx.process_groups)


def signature(graph: fx.Graph) -> list[str]:
    """The collectives the graph issues, in order, as text: op, group, shape and dtype."""
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", "") == "_c10d_functional" \
                and node.target != WAIT:
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            what = f"{tuple(val.shape)} {val.dtype}" if isinstance(val, torch.Tensor) else "?"
            args = ", ".join(str(a) for a in node.args[1:])
            out.append(f"{node.target.__name__}({what}, {args})")
    return out
