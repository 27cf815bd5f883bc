"""FX graph helpers shared by fvcompile's passes.

What a node is (a cast, an order-keeping view, a transpose), where its values go in the forward
(`forward_uses`), which nodes only compute gradients (`gradient_only_nodes`), which module a node
came from (`module_path`), and how to add a node with the fake value tracing would have given it
(`call`). Nothing here knows about a particular pass.
"""
from __future__ import annotations

import re
from collections import Counter

import torch
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

# Ops whose output holds their input's values (a clone is what Dropout(p=0.0) leaves in training).
CASTS = {prims.convert_element_type.default, aten._to_copy.default, aten.alias.default, aten.clone.default}
ORDER_KEEPING_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
                       aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
PERMUTES = {aten.permute.default, aten.transpose.int}


# ---- making nodes ------------------------------------------------------------------------------

def call(graph: fx.Graph, target, *args, **kwargs) -> fx.Node:
    """A call_function node at the graph's insertion point, with the fake value its inputs' fake
    values give (meta["val"], as tracing would have set it)."""
    node = graph.call_function(target, args, kwargs)
    args_val, kwargs_val = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    node.meta["val"] = target(*args_val, **kwargs_val)
    return node


def transposed(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """xᵀ of a 2-D x: the input of x where x is a transpose already, else a permute inserted at
    the graph's insertion point."""
    if is_transpose(x):
        return x.args[0]
    t = graph.call_function(aten.permute.default, (x, [1, 0]))
    t.meta = {**x.meta, "val": x.meta["val"].t()}
    return t


def replace_node(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    """Every use of `old` reads `new`; `old` is erased."""
    old.replace_all_uses_with(new)
    graph.erase_node(old)


# ---- what a node is ----------------------------------------------------------------------------

def shape_of(node) -> tuple | None:
    """The shape of a node's fake value, or None where it has none."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def last_dim_is(node: fx.Node, size) -> bool:
    """Whether node's value has at least one dim and its last one is `size`."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[-1] == size


def permutation(node: fx.Node) -> list[int] | None:
    """The dims order of a permute or transpose node, or None where the input's rank is unknown."""
    shape = shape_of(node.args[0])
    if shape is None:
        return None
    rank = len(shape)
    if node.target == aten.permute.default:
        return [d % rank for d in node.args[1]]
    dims = list(range(rank))
    i, j = (d % rank for d in node.args[1:3])
    dims[i], dims[j] = dims[j], dims[i]
    return dims


def keeps_order(node: fx.Node) -> bool:
    """Whether `node` is a view whose elements, read in row-major order, are its input's in the
    same order: a view or reshape, an unsqueeze or squeeze, a permute moving only size-1 dims."""
    if node.op != "call_function":
        return False
    if node.target in ORDER_KEEPING_VIEWS:
        return True
    if node.target in PERMUTES:
        dims, shape = permutation(node), shape_of(node.args[0])
        if dims is None:
            return False
        sized = [d for d in dims if not (isinstance(shape[d], int) and shape[d] == 1)]
        return sized == sorted(sized)
    return False


def is_transpose(node: fx.Node) -> bool:
    """permute(x, [1, 0]): a 2-D transpose."""
    return node.op == "call_function" and node.target == aten.permute.default and list(node.args[1]) == [1, 0]


def passes_values(node: fx.Node) -> bool:
    """A cast, or an order-keeping view (`keeps_order`): node holds the values of its first input,
    in the same places once both are flattened to rows of the last dim."""
    return node.op == "call_function" and (node.target in CASTS or keeps_order(node))


def depends_on_no_input(node: fx.Node) -> bool:
    """Whether `node` is computed from no graph input: from the graph's own randomness and
    constants only (a dropout mask), not from the model's activations or parameters."""
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur.op == "placeholder":
            return False
        seen.add(cur)
        todo += [i for i in cur.all_input_nodes if i not in seen]
    return True


def keeps_zeros(user: fx.Node, cur: fx.Node) -> bool:
    """`cur` times (or over) a number, or times a tensor of the graph's own randomness (dropout's
    mask): zero wherever `cur` is, same shape. A factor computed from the model's activations (a
    GLU's gate) is not taken: it may depend on what `cur`'s zeros were chosen from."""
    if user.target in (aten.div.Tensor, aten.div.Scalar):
        return user.args[0] is cur and isinstance(user.args[1], (int, float))
    if user.target not in (aten.mul.Tensor, aten.mul.Scalar) or len(user.args) != 2 or cur not in user.args:
        return False
    other = user.args[1] if user.args[0] is cur else user.args[0]
    if isinstance(other, (int, float)):
        return True
    return (isinstance(other, fx.Node) and other is not cur and same_shape(user, cur)
            and depends_on_no_input(other))


def describe(node: fx.Node) -> str:
    """A node's name and op, for a report's sentences."""
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})" if node.op == "call_function" else node.name


# ---- where values go ---------------------------------------------------------------------------

def gradient_only_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that compute gradients: those depending on a tangent, and those used only by them."""
    grad: set[fx.Node] = set()
    nodes = list(graph.nodes)
    for n in nodes:
        if n.op == "output":
            continue
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(
                i in grad for i in n.all_input_nodes):
            grad.add(n)
    for n in reversed(nodes):
        if n.op not in ("placeholder", "output") and n.users and all(u in grad for u in n.users):
            grad.add(n)
    return grad


def forward_uses(node: fx.Node, grad: set[fx.Node], keeping_zeros: bool = False) -> list[tuple[fx.Node, fx.Node]]:
    """The (user, input) pairs where `node`'s values, followed through casts and order-keeping
    views (`passes_values`), are used (users in `grad` are skipped); with `keeping_zeros`, also
    through scalings that keep its zeros (`keeps_zeros`: dropout)."""
    terminals, todo = [], [node]
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user in grad:
                continue
            passes = (passes_values(user) and user.args[0] is cur) or (keeping_zeros and keeps_zeros(user, cur))
            # copy(dst, cur) into a buffer of cur's shape holds cur's values (functionalized in-place ops)
            passes = passes or (user.target == aten.copy.default and user.args[1] is cur and same_shape(user, cur))
            if passes:
                todo.append(user)
            else:
                terminals.append((user, cur))
    return terminals


def value_source(x: fx.Node) -> fx.Node:
    """The node whose values x holds, followed up through casts and order-keeping views."""
    while passes_values(x):
        x = x.args[0]
    return x


# ---- where a node came from, and what a graph holds ---------------------------------------------

def module_path(node: fx.Node) -> str:
    """The dotted module path a node came from ("" when the graph does not record it); for a
    backward node of a joint graph, the module of the forward op it differentiates (AOTAutograd
    copies that op's stack to it as "fwd_nn_module_stack")."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo records paths like "L['self'].layers[0].feed_forward" (or L['model']... when a
    # function calls the module): drop the root, make them "layers.0.feed_forward".
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    return path.replace("[", ".").replace("]", "").replace("'", "")


def op_counts(graph: fx.Graph) -> Counter:
    """How many call_function nodes of each op the graph holds, by op name ("aten.mm.default")."""
    return Counter(str(n.target) for n in graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload))


def op_delta(before: Counter, after: Counter) -> dict[str, int]:
    """after - before, op by op, the ops whose count changed only (+: added, -: removed)."""
    return {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]}


def repair_order(graph: fx.Graph) -> None:
    """Move each node that now reads a value defined after it (a rewrite moved that value later)
    to just after its last input, keeping every other node where it is."""
    defined: set[fx.Node] = set()
    waiting: list[fx.Node] = []  # nodes whose inputs are not all defined yet, in graph order
    for node in list(graph.nodes):
        if any(i not in defined for i in node.all_input_nodes):
            waiting.append(node)
            continue
        defined.add(node)
        anchor = node
        progress = True
        while progress:  # nodes that waited for this one follow it, in their own order
            progress = False
            for w in list(waiting):
                if all(i in defined for i in w.all_input_nodes):
                    anchor.append(w)
                    anchor = w
                    defined.add(w)
                    waiting.remove(w)
                    progress = True
    if waiting:
        raise RuntimeError(f"repair_order: {waiting[0].name} reads a value no node defines (a cycle)")
