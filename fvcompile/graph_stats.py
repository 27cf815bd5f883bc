"""An FX graph as plain data, and the statistics the HTML report shows about it.

`graph_record(gm)` runs while the graph is live (the Dumper calls it at every hook and after each
pass): each node's op, inputs, output shape and dtype, and its FLOPs and bytes, read from the fake
values Dynamo and AOTAutograd leave in `node.meta["val"]`. Shapes are gone once the graph is
printed, so the record is what a report built later from a dump folder can count with.

The rest works on records: the op histogram, totals, the critical path (networkx's longest
path through the graph, weighted by FLOPs, or by bytes where a graph has no FLOPs), and the
nodes a pass changed.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import fx


def _tensors(value):
    """The tensors in a node's value (a tensor, or a tuple/list of them), others dropped."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(value) -> int:
    total = 0
    for t in _tensors(value):
        try:
            total += int(t.numel()) * t.element_size()
        except Exception:  # symbolic sizes without a hint: unknown, counted as 0
            pass
    return total


def _shape(value) -> list | None:
    tensors = _tensors(value)
    if not tensors:
        return None
    try:
        shapes = [[int(s) for s in t.shape] for t in tensors]
    except Exception:
        return None
    return shapes[0] if isinstance(value, torch.Tensor) else shapes


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"method:{node.target}"
    if node.op == "call_function":
        return _op_name(node.target)
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def _op_name(target) -> str:
    # aten.mm.default -> "aten.mm.default"; a Python function -> its qualified name.
    name = str(target) if isinstance(target, torch._ops.OpOverload) else None
    return name or getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def node_flops(node: fx.Node) -> int:
    """FLOPs of one aten node from torch.utils.flop_counter's formulas, on the fake values of its
    inputs and output; 0 for ops without a formula (elementwise ops, views) or without values."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(node.target, "overloadpacket", None)
    if node.op != "call_function" or packet not in flop_registry or "val" not in node.meta:
        return 0

    def value(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    try:
        return int(flop_registry[packet](*args, out_val=node.meta["val"], **kwargs))
    except Exception:  # a formula that does not fit these arguments: no count rather than a failed dump
        return 0


def graph_record(gm: fx.GraphModule) -> dict:
    """The graph as JSON-ready data: one entry per node, in graph order."""
    nodes = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        stack = node.meta.get("stack_trace") or ""
        nodes.append({
            "name": node.name,
            "op": node.op,
            "target": _target_name(node),
            "inputs": [n.name for n in node.all_input_nodes],
            "shape": _shape(val),
            "dtype": str(_tensors(val)[0].dtype).removeprefix("torch.") if _tensors(val) else None,
            "flops": node_flops(node),
            "bytes": _nbytes(val),
            "source": _last_frame(stack),
        })
    return {"nodes": nodes}


def _last_frame(stack_trace: str) -> str:
    """The user's line a node came from: the last `File ..., line N` of its stack trace with the
    code under it, e.g. 'models/llama.py:50  xf = xf * torch.rsqrt(...)'."""
    lines = stack_trace.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("File "):
            parts = line.split('"')
            where = parts[1] if len(parts) > 2 else "?"
            lineno = line.rsplit("line ", 1)[-1].split(",")[0]
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{where}:{lineno}  {code}"
    return ""


# What the report computes from records.

def op_histogram(record: dict) -> Counter:
    """How many nodes call each target (placeholders and the output left out)."""
    return Counter(n["target"] for n in record["nodes"] if n["op"] not in ("placeholder", "output", "get_attr"))


def to_networkx(record: dict):
    import networkx as nx

    g = nx.DiGraph()
    for n in record["nodes"]:
        g.add_node(n["name"], **n)
    for n in record["nodes"]:
        for i in n["inputs"]:
            if i in g:
                g.add_edge(i, n["name"])
    return g


def critical_path(record: dict) -> tuple[list[str], str, int]:
    """The heaviest chain of dependent nodes: (node names, "flops" or "bytes", its total). A node's
    weight is its FLOPs (its output bytes where the graph has no FLOPs at all); networkx's
    `dag_longest_path` weighs edges, so each edge carries the weight of the node it enters."""
    import networkx as nx

    g = to_networkx(record)
    if not g:
        return [], "flops", 0
    weight = "flops" if any(n["flops"] for n in record["nodes"]) else "bytes"
    for u, v in g.edges:
        g.edges[u, v]["w"] = g.nodes[v][weight]
    path = nx.dag_longest_path(g, weight="w", default_weight=0)
    return path, weight, sum(g.nodes[n][weight] for n in path)


def totals(record: dict) -> dict:
    nodes = [n for n in record["nodes"] if n["op"] not in ("placeholder", "output", "get_attr")]
    return {"nodes": len(record["nodes"]), "ops": len(nodes), "flops": sum(n["flops"] for n in nodes),
            "bytes": sum(n["bytes"] for n in nodes)}


def changed_nodes(before: dict, after: dict) -> tuple[set[str], set[str]]:
    """(nodes of `after` that are new or compute differently: another target or other inputs,
    nodes of `before` that are gone)."""
    old = {n["name"]: (n["target"], tuple(n["inputs"])) for n in before["nodes"]}
    new = {n["name"]: (n["target"], tuple(n["inputs"])) for n in after["nodes"]}
    changed = {name for name, sig in new.items() if old.get(name) != sig}
    return changed, set(old) - set(new)


def neighbourhood(record: dict, names: set[str], hops: int = 1) -> dict:
    """The part of the graph around `names`: those nodes and every node up to `hops` edges from
    them, in graph order (edges to nodes left out are dropped). What a pass changed, in context."""
    keep = set(names)
    users: dict[str, list[str]] = {}
    for n in record["nodes"]:
        for i in n["inputs"]:
            users.setdefault(i, []).append(n["name"])
    inputs = {n["name"]: n["inputs"] for n in record["nodes"]}
    frontier = set(names)
    for _ in range(hops):
        frontier = {m for name in frontier for m in inputs.get(name, []) + users.get(name, [])} - keep
        keep |= frontier
    nodes = [dict(n, inputs=[i for i in n["inputs"] if i in keep]) for n in record["nodes"] if n["name"] in keep]
    return {"nodes": nodes}
