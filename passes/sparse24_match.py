"""Matching for the sparse24 pass: one `FfnSite` record per Squared-ReLU FFN in a joint graph.

    h ─ relu ─[casts, views]─ pow(·, 2) | mul(r, r) ─[casts, views, dropout]─ mm(·, W2ᵀ) | addmm(·)

`match_site(relu, grad)` reads the graph around one relu and returns the site's record, a
`Skip` (a near miss and its reason), or None (not a site at all). It changes nothing; the rewrite
steps (passes/sparse24_steps.py) do. The helpers here also find, for a site, the backward nodes
the steps rewrite: dH (the relu's gradient) and the weight-gradient matmuls.

Not written with Inductor's pattern matcher: a site is defined by where its values go (every
forward use of r and of r² must be part of it; uses that only compute gradients do not count;
any number of casts, views and dropouts may sit in between), which a fixed pattern cannot say.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from fvcompile.kernels.sparse24 import ALIGN_K
from fvcompile.passes.graph_utils import (describe, forward_uses, is_transpose, keeps_order, last_dim_is,
                                          value_source)

aten = torch.ops.aten

KIND_FFN = "relu2_ffn"  # Site.kind of an FFN site
KIND_RELU = "relu"  # a relu not squared
KIND_SQUARE = "square"  # a square of something other than a relu


@dataclass
class FfnSite:
    """One Squared-ReLU FFN, as matched (before any rewrite)."""

    relu: fx.Node  # r = relu(h)
    square: fx.Node  # r², the activation A
    matmuls: list[fx.Node]  # the forward mm/addmm nodes consuming A (the second linear)
    hidden: int  # the hidden width, the last dim of h
    h_linear: fx.Node | None = None  # the mm/addmm computing h (the first linear), where there is one
    operands: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (A's view, W2ᵀ) of each matmul


@dataclass
class Skip:
    """A near miss: what it is (Site.kind), a snake_case reason code, and a sentence."""

    kind: str
    reason: str
    detail: str


def is_relu(node: fx.Node) -> bool:
    """relu(x), or a spelling of it: clamp_min(x, 0), clamp(x, 0) (`torch.clamp(x, min=0)`)."""
    if node.op != "call_function":
        return False
    if node.target == aten.clamp_min.default:
        return node.args[1] == 0
    if node.target == aten.clamp.default:
        return len(node.args) >= 2 and node.args[1] == 0 and (len(node.args) < 3 or node.args[2] is None) \
            and node.kwargs.get("max") is None
    return node.target == aten.relu.default


def is_square_of(node: fx.Node, base: fx.Node) -> bool:
    if node.target == aten.pow.Tensor_Scalar:
        return node.args[0] is base and node.args[1] == 2
    if node.target == aten.mul.Tensor:
        return node.args[0] is base and node.args[1] is base
    return node.target == aten.square.default and node.args[0] is base


def is_square(node: fx.Node) -> bool:
    return node.op == "call_function" and len(node.args) >= 1 and isinstance(node.args[0], fx.Node) \
        and is_square_of(node, node.args[0])


def match_site(relu: fx.Node, grad: set[fx.Node]) -> FfnSite | Skip | None:
    """The FFN site rooted at `relu`, the reason it does not fit, or None: not a site."""
    hidden = relu.meta["val"].shape[-1] if isinstance(relu.meta.get("val"), torch.Tensor) else None
    # Views may sit between relu and square: an in-place relu (`F.relu(h, inplace=True)`,
    # `nn.ReLU(inplace=True)`) reaches the graph as relu, then views back to h's shape.
    terminals = forward_uses(relu, grad)
    squares = [u for u, src in terminals if is_square_of(u, src)]
    others = [u for u, src in terminals if not is_square_of(u, src)]
    if not squares:  # a clamp(min=0) not squared is no site at all (box coordinates, losses, ...)
        return Skip(KIND_RELU, "not_squared", "relu is not squared (a plain ReLU)") \
            if relu.target == aten.relu.default else None
    if others or len(squares) > 1:
        extra = (others + squares[1:])[0]
        return Skip(KIND_FFN, "extra_use", f"relu output is also used by {describe(extra)}")
    square = squares[0]
    # Dropout may sit between relu² and the matmul: its zeros keep 2:4 what is 2:4.
    consumers = forward_uses(square, grad, keeping_zeros=True)
    if not consumers:
        return Skip(KIND_FFN, "not_a_matmul", "relu² not consumed by a matmul (no forward use)")
    matmuls = []
    for user, src in consumers:
        is_mm = user.target == aten.mm.default and user.args[0] is src and user.args[1] is not src
        is_addmm = (user.target == aten.addmm.default and user.args[1] is src
                    and user.args[2] is not src and not user.kwargs)
        if not (is_mm or is_addmm):
            return Skip(KIND_FFN, "not_a_matmul", f"relu² not consumed by a matmul (used by {describe(user)})")
        if isinstance(hidden, int) and not last_dim_is(src, hidden):
            return Skip(KIND_FFN, "not_hidden_reduction",
                        f"relu² reaches {describe(user)} reshaped: the matmul does not reduce over the hidden dim")
        matmuls.append(user)
    if not isinstance(hidden, int):
        return Skip(KIND_FFN, "dynamic_hidden", "hidden width is dynamic")
    if hidden % ALIGN_K:
        return Skip(KIND_FFN, "hidden_not_aligned",
                    f"hidden width {hidden} is not a multiple of {ALIGN_K} (the 2:4 sparse matmul's alignment)")
    operands = [(mm.args[0], mm.args[1]) if mm.target == aten.mm.default else tuple(mm.args[1:3]) for mm in matmuls]
    return FfnSite(relu, square, matmuls, hidden, producer_mm(relu.args[0]), operands)


def other_square(node: fx.Node, grad: set[fx.Node]) -> Skip | None:
    """A square that is not of a relu (RMSNorm's x²): close to the pattern, not it. None for
    anything else, and for squares of a relu (those are reported with their relu)."""
    if node.op != "call_function" or node in grad or not is_square(node):
        return None
    base = value_source(node.args[0])
    if is_sparse_relu(base) or is_relu(base):
        return None  # a site this pass rewrote, or a relu reported with its own reason
    what = getattr(base.target, "__name__", base.op).split(".")[0]
    return Skip(KIND_SQUARE, "not_of_relu", f"square of {what}, not of a relu (e.g. RMSNorm's x²)")


def is_sparse_relu(node: fx.Node) -> bool:
    """r of a site this pass rewrote: sparse24_relu(h), or sparse24_relu_max(h)[0]."""
    fvc = torch.ops.fvcompile
    if node.target is operator.getitem:
        return node.args[0].target == fvc.sparse24_relu_max.default and node.args[1] == 0
    return node.target == fvc.sparse24_relu.default


def merge_twin_relus(graph: fx.Graph, grad: set[fx.Node]) -> None:
    """`relu(h) * relu(h)`, two relu nodes of one input, becomes `r * r` (exact: the same values;
    each relu's gradient formula then reads the one left)."""
    for mul in list(graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        a, b = mul.args[:2]
        if (mul not in grad and isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b
                and is_relu(a) and is_relu(b) and a.args[0] is b.args[0] and a not in grad and b not in grad):
            b.replace_all_uses_with(a)
            graph.erase_node(b)


# ---- the backward nodes of a site ---------------------------------------------------------------

def relu_input(r: fx.Node) -> fx.Node:
    """h, for r = relu(h), the sparse relu r = sparse24_relu(h), or r = sparse24_relu_max(h)[0]."""
    return r.args[0].args[0] if r.target is operator.getitem else r.args[0]


def relu_grad_nodes(r: fx.Node) -> list[fx.Node]:
    """The relu-gradient nodes, dH: `where(le(r, 0), 0, g)` or `threshold_backward(g, r, 0)` reading
    the relu's output r (or an alias or view of it: an in-place relu's gradient reads a view), or
    `where(ge(h, 0), g, 0)` reading its input h (clamp_min's gradient)."""
    readers, todo = [], [r]
    while todo:  # r, its aliases and views
        cur = todo.pop()
        readers.append(cur)
        todo += [u for u in cur.users if (u.target == aten.alias.default or keeps_order(u)) and u.args[0] is cur]
    found = []
    for reader in readers:
        for u in reader.users:
            if u.target == aten.threshold_backward.default and u.args[1] is reader:
                found.append(u)
            elif u.target == aten.le.Scalar and u.args[0] is reader and u.args[1] == 0:
                found += [w for w in u.users if w.target == aten.where.self and w.args[0] is u]
    for u in relu_input(r).users:
        if u.target == aten.ge.Scalar and u.args[1] == 0:
            found += [w for w in u.users if w.target == aten.where.self and w.args[0] is u]
    return found


def dh_nodes(r: fx.Node) -> list[fx.Node]:
    """dH, the relu's gradient (one node, or the sum of two for merged twin relus)."""
    found = relu_grad_nodes(r)
    # relu(h) * relu(h), its twin relus merged into one: each had a gradient, and dH is their sum.
    sums = {u for w in found for u in w.users
            if u.target == aten.add.Tensor and all(a in found for a in u.args[:2])}
    return list(sums) + [w for w in found if not any(u in sums for u in w.users)]


def dh_users(r: fx.Node, hidden: int) -> list[tuple[fx.Node, fx.Node]]:
    """(user, dH or its view) for every user of dH, the relu's gradient read from r: where the
    backward's dX and dW1 matmuls are found."""
    return [(user, src) for node in dh_nodes(r) for user, src in forward_uses(node, set())
            if last_dim_is(src, hidden)]


def squares_and_gradients(graph: fx.Graph) -> set[fx.Node]:
    """Every relu's squares and gradients, and what their values reach (through views and
    dropout): the tensors whose einsum matmuls may be a site's."""
    found = set()
    for relu in (n for n in graph.nodes if is_relu(n)):
        for node in dh_nodes(relu):
            found.update([node, *(src for _, src in forward_uses(node, set()))])
        for square in (u for u, src in forward_uses(relu, set()) if is_square_of(u, src)):
            found.update([square, *(src for _, src in forward_uses(square, set(), keeping_zeros=True))])
    return found


def token_contractions(s: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """The matmuls contracting s (tokens, hidden) over its tokens, a weight gradient, as (mm, its
    other operand): written gᵀ·s (nn.Linear's dW) or sᵀ·g (einsum's)."""
    found = []
    for user in s.users:
        if user.target == aten.mm.default and user.args[1] is s and user.args[0] is not s:
            found.append((user, user.args[0]))
        elif user.args and user.args[0] is s and is_transpose(user):
            found += [(mm, mm.args[1]) for mm in user.users
                      if mm.target == aten.mm.default and mm.args[0] is user and mm.args[1] is not user]
    return found


def producer_mm(x: fx.Node) -> fx.Node | None:
    """The mm/addmm whose values x holds (through casts and order-keeping views): h's linear."""
    x = value_source(x)
    return x if x.op == "call_function" and x.target in (aten.mm.default, aten.addmm.default) else None


def input_grad_mms(b: fx.Node) -> list[fx.Node]:
    """The backward matmuls dY · bᵀ of a forward mm(a, b), as AOTAutograd writes them: mm(dY,
    permute(b)) (the FFN's dA = dY · W2)."""
    return [mm for t in b.users if is_transpose(t)
            for mm in t.users if mm.target == aten.mm.default and mm.args[1] is t]
