"""Batch-1 `bmm` as `mm`, and back: how a pass sees an einsum linear as the linear it is.

`torch.einsum("btf,df->btd", a, w)` reaches the joint graph as a `bmm` of batch 1 between
unsqueezes and permutes that only move size-1 dims, where `a @ w.t()` or `F.linear` reach it as
views and an `mm`. `as_mm` rewrites the `bmm`s of static batch 1 that read given tensors into
`unsqueeze(mm(squeeze(a, 0), squeeze(b, 0)), 0)` (the same product), a batch transpose of an
operand (`permute(x, [0, 2, 1])`) becoming a 2-D transpose of its squeeze, so that a pass matching
`mm` and `permute(·, [1, 0])` also matches einsum's forms; `keeps_order` lets it follow the views
in between. `as_bmm` then puts back a `bmm` wherever the pass left an `mm` unchanged, so that
nothing it did not rewrite changes.

Not written with Inductor's pattern matcher: which bmms to rewrite depends on what the calling
pass matches (the `sources`), and the rewrite is undone afterwards for each one the pass left
alone; a pattern replacement is applied on its own, with no such round trip.
"""
from __future__ import annotations

import torch
from torch import fx

from fvcompile.passes.graph_utils import ORDER_KEEPING_VIEWS, PERMUTES, call, keeps_order, permutation, shape_of

aten = torch.ops.aten


def _is_batch_transpose(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in PERMUTES and permutation(node) == [0, 2, 1]


def reads(node: fx.Node, sources: set[fx.Node]) -> bool:
    """Whether `node` is one of `sources`, or a view of one through order-keeping views and
    batch transposes."""
    while node not in sources and isinstance(node, fx.Node) and (keeps_order(node) or _is_batch_transpose(node)):
        node = node.args[0]
    return node in sources


def as_mm(graph: fx.Graph, sources: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """Every bmm of static batch 1 with an operand that `reads` one of `sources`, rewritten as an
    mm (see the module docstring); returns the (mm, unsqueeze of it) pairs that replace them, for
    `as_bmm`."""
    squeezed: dict[fx.Node, fx.Node] = {}

    def two_d(x: fx.Node) -> fx.Node:
        if x in squeezed:
            return squeezed[x]
        with graph.inserting_after(x):
            if _is_batch_transpose(x):  # permute(y, [0, 2, 1]) -> permute(squeeze(y, 0), [1, 0])
                inner = two_d(x.args[0])
                with graph.inserting_after(inner):
                    node = call(graph, aten.permute.default, inner, [1, 0])
            else:
                node = call(graph, aten.squeeze.dim, x, 0)
        node.meta.update({k: v for k, v in x.meta.items() if k != "val"})
        squeezed[x] = node
        return node

    mms = []
    for bmm in list(graph.find_nodes(op="call_function", target=aten.bmm.default)):
        shapes = [shape_of(x) for x in bmm.args[:2]]
        if not all(s is not None and len(s) == 3 and isinstance(s[0], int) and s[0] == 1 for s in shapes):
            continue
        if not any(reads(x, sources) for x in bmm.args[:2]):
            continue
        a, b = (two_d(x) for x in bmm.args[:2])
        with graph.inserting_before(bmm):
            mm = call(graph, aten.mm.default, a, b)
            out = call(graph, aten.unsqueeze.default, mm, 0)
        for node in (mm, out):
            node.meta.update({k: v for k, v in bmm.meta.items() if k != "val"})
        bmm.replace_all_uses_with(out)
        _erase_unused(graph, bmm)
        mms.append((mm, out))
    return mms


def as_bmm(graph: fx.Graph, mms: list[tuple[fx.Node, fx.Node]]) -> None:
    """Put back a bmm for every mm of `as_mm` still in the graph (the pass did not rewrite it)."""
    alive = set(graph.nodes)
    for mm, out in mms:
        if mm not in alive or out not in alive or list(mm.users) != [out]:
            continue
        with graph.inserting_before(out):
            a, b = (call(graph, aten.unsqueeze.default, x, 0) for x in mm.args)
            bmm = call(graph, aten.bmm.default, a, b)
        bmm.meta.update({k: v for k, v in mm.meta.items() if k != "val"})
        out.replace_all_uses_with(bmm)
        _erase_unused(graph, out)


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and then every view or mm above it that nothing reads any more."""
    todo = [node]
    while todo:
        cur = todo.pop()
        if cur.users or cur.op != "call_function":
            continue
        inputs = cur.all_input_nodes
        graph.erase_node(cur)
        todo += [i for i in inputs if i.op == "call_function"
                 and (i.target in ORDER_KEEPING_VIEWS | PERMUTES or i.target == aten.mm.default)]
