"""How long a graph with collectives takes on a GPU, and how much memory it holds, simulated from
the graph alone (no device, no data: fake values are enough).

`simulate(graph, cost)` runs the graph's nodes in order on two streams, as a GPU runs a
compiled FSDP step:

- the compute stream runs each node for `cost.node_s(node)` (views and collectives take none);
- one communication stream runs the collectives one after another: a collective starts when the
  compute stream reaches its node and the communication stream is free, and lasts
  `cost.collective_s(kind, bytes, group size)`;
- a `wait_tensor` blocks the compute stream until its collective has ended: the time it waits is
  exposed communication; the rest of a collective's time was hidden behind compute.

So the order of the graph (what `fsdp_reordering` changes) and its collectives (what
`fsdp_bucketing` merges) decide the step time, with the same cost model the passes plan with.

`memory_walk(graph, ...)` walks the same order and adds up the bytes of the values alive after
each node (a value lives from the node that makes it to its last use; views share their base's
bytes), giving the graph's peak: activations, gathered parameters and gradients in flight, as
the graph holds them before Inductor's own buffer reuse.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from fvcompile.passes.fsdp_collectives import KINDS, WAIT
from fvcompile.passes.fsdp_cost import CostModel
from fvcompile.passes.graph_utils import module_path

aten = torch.ops.aten


# ---- time ----------------------------------------------------------------------------------------

@dataclass
class CollectiveSpan:
    """One collective on the communication stream."""

    node: str
    kind: str  # "all_gather", "reduce_scatter" or "all_reduce"
    module: str
    bytes: int  # what it moves: the gathered tensor, or the tensor before reduction
    group_size: int
    start_s: float  # when the communication stream starts it
    end_s: float
    issued_s: float = 0.0  # when the compute stream reached its node (it may queue after that)
    exposed_s: float = 0.0  # how long its wait held the compute stream


@dataclass
class Timeline:
    """What `simulate` found for one graph (seconds)."""

    step_s: float  # from the first node to the end of the last node or collective
    compute_s: float  # the compute stream's busy time
    comm_s: float  # the communication stream's busy time
    exposed_comm_s: float  # time the compute stream waited on a collective
    collectives: list[CollectiveSpan] = field(default_factory=list)

    @property
    def hidden_comm_s(self) -> float:
        return self.comm_s - self.exposed_comm_s


def simulate(graph: fx.Graph, cost: CostModel) -> Timeline:
    """The graph run in order on one compute stream and one communication stream (module docstring)."""
    now = comm_free = compute = exposed = 0.0
    pending: dict[fx.Node, CollectiveSpan] = {}
    spans = []
    for node in graph.nodes:
        if _is_collective(node):
            span = _collective_span(node, cost, issued=now, comm_free=comm_free)
            comm_free = span.end_s
            pending[node] = span
            spans.append(span)
        elif node.op == "call_function" and node.target == WAIT and node.args[0] in pending:
            span = pending.pop(node.args[0])
            wait = max(0.0, span.end_s - now)
            span.exposed_s += wait
            exposed += wait
            now += wait
        else:
            seconds = cost.node_s(node)
            now += seconds
            compute += seconds
    comm = sum(s.end_s - s.start_s for s in spans)
    return Timeline(max(now, comm_free), compute, comm, exposed, spans)


def _is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in KINDS


def _collective_span(node: fx.Node, cost: CostModel, issued: float, comm_free: float) -> CollectiveSpan:
    """A collective issued at `issued` on a communication stream free from `comm_free`."""
    kind = KINDS[node.target]
    nbytes, group_size = collective_bytes(node), collective_group_size(node)
    start = max(issued, comm_free)
    end = start + cost.collective_s(kind, nbytes, group_size)
    return CollectiveSpan(node.name, kind, module_path(node), nbytes, group_size, start, end, issued_s=issued)


def collective_bytes(node: fx.Node) -> int:
    """What a collective moves: the gathered output of an all-gather, the input of a reduction."""
    val = node.meta.get("val") if KINDS[node.target] == "all_gather" else node.args[0].meta.get("val")
    return value_bytes(val)


def collective_group_size(node: fx.Node) -> int:
    """The number of ranks of a functional collective's group."""
    kind = KINDS[node.target]
    if kind == "all_gather":  # (input, group_size, group_name)
        return int(node.args[1])
    if kind == "reduce_scatter":  # (input, reduce_op, group_size, group_name)
        return int(node.args[2])
    import torch.distributed as dist  # all_reduce(input, reduce_op, group_name): ask the group
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_world_size(_resolve_process_group(node.args[2]))


# ---- memory --------------------------------------------------------------------------------------

# Ops whose result is stored in their first input's memory (beyond the ops that say so in their
# schema): a collective's wait returns the collective's buffer; `_unsafe_view` reinterprets a matmul's.
_ALIASING = {WAIT, aten._unsafe_view.default}


@dataclass
class MemoryWalk:
    """What `memory_walk` found for one graph (bytes)."""

    peak_bytes: int
    peak_node: str  # the node after which the peak is reached
    start_bytes: int  # the counted inputs
    end_bytes: int  # what is still alive after the last node: the values the graph returns


def saved_activations(graph: fx.Graph) -> list[fx.Node]:
    """A backward graph's inputs other than the parameters (`primals_*`): the activations the
    forward saved for it (and its tangents), which it holds from its start."""
    return [n for n in graph.find_nodes(op="placeholder") if not n.name.startswith("primals")]


def memory_walk(graph: fx.Graph, counted_inputs=(), count_outputs: bool = True) -> MemoryWalk:
    """The bytes alive after each node, in graph order, and their peak.

    counted_inputs: the placeholders whose memory this walk holds (e.g. the activations a
        backward graph receives), alive until their last use; other inputs (parameter shards,
        tokens) are left to whoever counts them.
    count_outputs: whether the values the graph returns count (a forward's saved activations stay
        alive to the end) or not (a backward's reduced gradient shards, counted as the sharded
        gradients elsewhere, are then left out from the node that makes them).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    root = {n: _storage_root(n) for n in graph.nodes}
    returned = {root[n] for out in graph.find_nodes(op="output") for n in out.all_input_nodes}
    counted = set(counted_inputs)
    last_use = _last_uses(graph, root, order)
    alive = start = sum(value_bytes(n.meta.get("val")) for n in counted)
    peak, peak_node = alive, "(inputs)"
    frees: dict[int, list[fx.Node]] = {}
    for r, i in last_use.items():
        frees.setdefault(i, []).append(r)
    for i, node in enumerate(graph.nodes):
        if root[node] is node and node.op == "call_function" and (count_outputs or node not in returned):
            alive += value_bytes(node.meta.get("val"))
        if alive > peak:
            peak, peak_node = alive, node.name
        for r in frees.get(i, ()):
            if r in returned and count_outputs:
                continue  # returned: alive past the graph's end
            if r.op == "call_function" and (count_outputs or r not in returned) or r in counted:
                alive -= value_bytes(r.meta.get("val"))
    return MemoryWalk(peak, peak_node, start, alive)


def _storage_root(node: fx.Node) -> fx.Node:
    """The node whose memory `node`'s value lives in (itself, unless it is a view or alias)."""
    while _aliases_input(node):
        node = node.args[0]
    return node


def _aliases_input(node: fx.Node) -> bool:
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem or node.target in _ALIASING:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _last_uses(graph: fx.Graph, root: dict, order: dict) -> dict[fx.Node, int]:
    """For each storage root, the position of the last node that reads it or one of its views.
    A collective reads its input until its wait: the data moves in between."""
    last: dict[fx.Node, int] = {}
    for node in graph.nodes:
        last.setdefault(root[node], order[node])
        waits = [order[u] for u in node.users if u.target == WAIT] if _is_collective(node) else []
        end = max([order[node], *waits])
        for inp in node.all_input_nodes:
            r = root[inp]
            last[r] = max(last.get(r, 0), end)
    return last


def value_bytes(val) -> int:
    """The bytes of a fake value, or of a tuple or list of them."""
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(value_bytes(v) for v in val)
    return 0
