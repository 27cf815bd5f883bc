"""The rewrites of one sparse24 FFN site, as separate steps over its match record.

Each step takes a `SiteRewrite` (the graph, the site's `FfnSite` record, and what the pass
decided for it), edits the graph, and returns what it did as phrases for the report. The pass
chooses the steps (`steps_for`) and runs them in order:

- `sparse_relu`: relu(h) -> sparse24_relu(h) (or sparse24_relu_max with FP8 scales); this alone
  is the emulated path: the matmuls stay dense on the 2:4 tensors.
- `sparse_dw2`, `sparse_dw1`: the weight gradients as 2:4 matmuls along the tokens.
- `sparse_forward`, `sparse_dx`: the forward matmul reading A, and dX = dH · W1, as 2:4 matmuls.
- `dense_fp8`: the FFN's matmuls left dense, in FP8 (passes/fp8_matmuls.py).

`sparse_relu` runs first: the others read the sparse relu it leaves in `SiteRewrite.r`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from fvcompile.passes import fp8_matmuls
from fvcompile.passes.graph_utils import CASTS, call, passes_values, replace_node, transposed
from fvcompile.passes.sparse24_config import Sparse24Config
from fvcompile.passes.sparse24_match import FfnSite, dh_users, input_grad_mms, token_contractions

aten = torch.ops.aten
fvc = torch.ops.fvcompile

DENSE_FEATURES = 0.05  # of dW1's rows (features), the densest, multiplied whole (the paper's split)


@dataclass
class SiteRewrite:
    """One site being rewritten: its record, what the pass decided, and the nodes steps leave."""

    graph: fx.Graph
    site: FfnSite
    training: bool  # a joint graph (forward and backward), else an inference graph
    fp8: bool
    with_maxima: bool  # the selection also yields r's row and column maxima (FP8 scales)
    schedule: str = ""  # the ops' warm-up schedule key (`WarmupSchedule.key`; "": no warm-up)
    r: fx.Node | None = None  # the sparse relu (set by `sparse_relu`)
    row_max: fx.Node | None = None  # r's row maxima, where the selection yields them
    col_max: fx.Node | None = None

    def sparse_mm(self, a: fx.Node, b: fx.Node, **options) -> fx.Node:
        """A sparse24_mm node (forward, dX) of this site's schedule, at the insertion point."""
        return self.graph.call_function(fvc.sparse24_mm.default, (a, b), {"schedule": self.schedule, **options})

    def weight_grad_mm(self, a: fx.Node, b: fx.Node, **options) -> fx.Node:
        """A sparse24_weight_grad_mm node (dW1, dW2) of this site's schedule, at the insertion point."""
        return self.graph.call_function(fvc.sparse24_weight_grad_mm.default, (a, b),
                                        {"schedule": self.schedule, **options})


Step = Callable[[SiteRewrite], list[str]]


def steps_for(config: Sparse24Config, training: bool, use_mm: bool) -> list[Step]:
    """The steps that rewrite a site under `config`: in a training graph or not, with the matmuls
    rewritten into sparse24_mm (use_mm) or left dense on the 2:4 tensors (the emulated path)."""
    steps: list[Step] = [sparse_relu]
    if training and config.sparse_dw2:
        steps.append(sparse_dw2)
    if training and config.sparse_dw1:
        steps.append(sparse_dw1)
    if use_mm:
        steps.append(sparse_forward)
        if training:
            steps.append(sparse_dx)
        if config.fp8:
            steps.append(dense_fp8)
    return steps


def sparse_relu(rw: SiteRewrite) -> list[str]:
    """relu(h) -> sparse24_relu(h): relu, then the 2 largest of every 4 along the hidden dim.

    Squaring is monotone on relu's output, so this is the 2:4 selection of relu(h)² too. The joint
    graph's backward is written in terms of the relu's output r (the square's `2 * r * grad`, the
    relu's `where(le(r, 0), 0, ·)`): reading the sparse r, it is the gradient of the sparse
    function, with no custom autograd in the graph.
    """
    graph, relu = rw.graph, rw.site.relu
    h = relu.args[0]
    # In a training graph the sparse relu counts the warm-up's steps: one per forward call.
    options = {"schedule": rw.schedule, "count_step": rw.training and bool(rw.schedule)}
    with graph.inserting_before(relu):
        if rw.with_maxima:
            # The selection also yields r's row and column maxima, the FP8 scales of the forward
            # matmul (rows) and of the sparse dW2 (columns), so that neither reads r for them.
            both = graph.call_function(fvc.sparse24_relu_max.default, (h,), options)
            both.meta = {**relu.meta, "val": fvc.sparse24_relu_max.default(h.meta["val"], **options)}
            rw.r, rw.row_max, rw.col_max = (graph.call_function(operator.getitem, (both, i)) for i in range(3))
            for i, node in enumerate((rw.r, rw.row_max, rw.col_max)):
                node.meta = {**relu.meta, "val": both.meta["val"][i]}
        else:
            rw.r = graph.call_function(fvc.sparse24_relu.default, (h,), options)
            rw.r.meta = dict(relu.meta)
    if rw.training and rw.schedule:
        # This op counts the warm-up's steps: activation checkpointing must not recompute it in
        # the backward, which would count each step twice and could select where the forward
        # ran dense. Its outputs are saved instead; with FP8 maxima, the op and its three outputs.
        for node in (rw.r,) if rw.row_max is None else (rw.r.args[0], rw.r, rw.row_max, rw.col_max):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    replace_node(graph, relu, rw.r)
    return ["relu -> sparse24_relu" + ("_max (r, and its row and column maxima for FP8)" if rw.row_max else "")]


def sparse_dw2(rw: SiteRewrite) -> list[str]:
    """dW2 = dYᵀ·A -> sparse24_mm(Aᵀ, dY, transpose_out=True): Aᵀ 2:4-selected along its last dim,
    the tokens (grouped strided), the product in the weight's own layout (einsum's Aᵀ·dY takes it
    as it is). Where A is r², the op reads r and squares as it packs: A is never written."""
    graph, done = rw.graph, []
    for a, _ in rw.site.operands:
        for mm, other in token_contractions(a):
            is_transposed = mm.args[1] is a  # dYᵀ·A = (Aᵀ·dY)ᵀ
            r = same_views(graph, a, rw.site.square, rw.r, mm)
            with graph.inserting_before(mm):
                a_t = transposed(graph, a if r is None else r)
                d_y = transposed(graph, other) if is_transposed else other
                # col_max (FP8): r's column maxima, the rows of rᵀ, from the selection's pass.
                a_max = {"a_max": rw.col_max} if r is not None and rw.col_max is not None else {}
                d_w = rw.weight_grad_mm(a_t, d_y, square=r is not None, transpose_out=is_transposed, fp8=rw.fp8,
                                        **a_max)
            d_w.meta = dict(mm.meta)
            replace_node(graph, mm, d_w)
            done.append("dW2 matmul -> sparse24_weight_grad_mm (2:4 along tokens"
                        + (", reads r)" if r is not None else ")"))
    return done


def sparse_dw1(rw: SiteRewrite) -> list[str]:
    """dW1 = dHᵀ·X -> sparse24_mm(dHᵀ, X): dHᵀ 2:4-selected along its last dim, the tokens
    (grouped strided), its densest rows (features) kept whole. FP8: the rows' maxima are dH's
    column maxima, from the graph (beside dX's row maxima, over the same dH)."""
    graph, done = rw.graph, []
    for d_h in dict.fromkeys(src for _, src in dh_users(rw.r, rw.site.hidden)):
        for mm, other in token_contractions(d_h):
            is_transposed = mm.args[1] is d_h  # Xᵀ·dH (einsum's): (dHᵀ·X)ᵀ
            with graph.inserting_before(mm):
                d_h_t = transposed(graph, d_h) if is_transposed else mm.args[0]
                x = transposed(graph, other) if is_transposed else other
                a_max = {"a_max": abs_max_node(graph, d_h, 0, mm)} if rw.fp8 else {}
                d_w = rw.weight_grad_mm(d_h_t, x, transpose_out=is_transposed, fp8=rw.fp8, dense_rows=DENSE_FEATURES,
                                        row_counts=nonzero_count_node(graph, d_h, 0, mm), **a_max)
            d_w.meta = dict(mm.meta)
            replace_node(graph, mm, d_w)
            done.append(f"dW1 matmul -> sparse24_weight_grad_mm (2:4 along tokens, {DENSE_FEATURES:.0%} densest "
                        "features dense)")
    return done


def sparse_forward(rw: SiteRewrite) -> list[str]:
    """The forward matmuls reading A -> sparse24_mm. In training the op reads r and squares as it
    packs (r² never written); in an inference graph, where nothing else needs r, it reads h itself:
    relu, 2:4, square and pack in one pass, and the sparse relu goes."""
    graph, site = rw.graph, rw.site
    base = rw.r if rw.training else rw.r.args[0]
    fused = []  # the operands (views of r²) the sparse matmuls no longer read
    for mm, (operand, _) in zip(site.matmuls, site.operands):
        views = same_views(graph, operand, site.square, base, mm)
        if views is not None:
            fused.append(operand)
        to_sparse_mm(rw, mm, of_relu=views, from_h=not rw.training,
                     a_max=rw.row_max if views is not None else None)
    if not rw.training:
        for operand in fused:
            erase_unused(graph, operand, rw.r)
    how = " (reads r, squares as it packs)" if rw.training else " (reads h: relu, 2:4, square, pack in one pass)"
    return [f"{len(site.matmuls)} forward matmul(s) -> sparse24_mm" + (how if len(fused) == len(site.matmuls) else "")]


def sparse_dx(rw: SiteRewrite) -> list[str]:
    """dX = dH · W1 -> sparse24_mm: dH, the relu's gradient, is 2:4 along the hidden dim, which is
    this matmul's K: a sparse matmul with no further approximation."""
    graph = rw.graph
    dx = [u for u, src in dh_users(rw.r, rw.site.hidden)
          if u.target == aten.mm.default and u.args[0] is src and u.args[1] is not src]
    for mm in dx:
        # FP8: dH's row maxima in the graph, where Inductor can fuse them into dH's own kernel.
        a_max = abs_max_node(graph, mm.args[0], 1, mm) if rw.fp8 else None
        to_sparse_mm(rw, mm, a_max=a_max)
    return ["dX matmul -> sparse24_mm"] if dx else []


def dense_fp8(rw: SiteRewrite) -> list[str]:
    """The FFN's matmuls left dense, into FP8 with row-wise scales (passes/fp8_matmuls.py): h's
    linear, and in training dA = dY · W2 and whichever of dW1 and dW2 are not 2:4 sparse. FP8 is
    not warmed up: during a dense warm-up the FFN runs dense in FP8 (kernels/sparse24_mm.py)."""
    site = rw.site
    dense = [site.h_linear] if site.h_linear is not None else []
    if rw.training:
        for a, b in site.operands:
            dense += input_grad_mms(b) + [mm for mm, _ in token_contractions(a)]  # dA; dW2 if dense
        for d_h in dict.fromkeys(src for _, src in dh_users(rw.r, site.hidden)):
            dense += [mm for mm, _ in token_contractions(d_h)]  # dW1 if dense
    dense = list(dict.fromkeys(dense))
    left = [why for mm in dense if (why := fp8_matmuls.to_fp8(rw.graph, mm))]
    converted = len(dense) - len(left)
    if site.h_linear is None:
        left.append("h's own linear, not an mm/addmm (an einsum's bmm, say)")
    return [f"{converted} dense matmul(s) in FP8 (row-wise scales, _scaled_mm)"
            + (f"; left as they were: {'; '.join(left)}" if left else "")]


# ---- helpers of the steps ---------------------------------------------------------------------

def to_sparse_mm(rw: SiteRewrite, mm: fx.Node, of_relu: fx.Node | None = None, from_h: bool = False,
                 a_max: fx.Node | None = None) -> None:
    """mm/addmm(a, b) -> sparse24_mm(a, b) for an `a` that is 2:4 already (no second selection);
    given `of_relu` (r where a = r², or h where a = relu(h)² and from_h), sparse24_mm(of_relu, b,
    square=True[, relu=True]); a_max: the operand's row maxima, where the graph has them."""
    if mm.target == aten.addmm.default:
        bias, a, b = mm.args
    else:
        (a, b), bias = mm.args, None
    with rw.graph.inserting_before(mm):
        options = {"a_max": a_max} if a_max is not None else {}
        if of_relu is None:
            new = rw.sparse_mm(a, b, select=False, fp8=rw.fp8, **options)
        else:
            new = rw.sparse_mm(of_relu, b, select=False, square=True, relu=from_h, fp8=rw.fp8, **options)
        new.meta = dict(mm.meta)
        if bias is not None:
            new = rw.graph.call_function(aten.add.Tensor, (new, bias))
            new.meta = dict(mm.meta)
    replace_node(rw.graph, mm, new)


def same_views(graph: fx.Graph, operand: fx.Node, square: fx.Node, base: fx.Node,
               before: fx.Node) -> fx.Node | None:
    """`operand` = views(casts(square(casts(r)))) for the sparse relu r: the same views of `base`
    (r, or relu's input h) inserted before `before`, so that a sparse matmul can read `base` and
    square as it packs (r² is then never written out). None where that would change the numbers:
    `base` in another dtype than `operand` (squaring in that dtype would round differently)."""
    views, cur = [], operand
    while cur is not square:
        if not passes_values(cur):
            return None
        if cur.target not in CASTS:
            views.append(cur)
        cur = cur.args[0]
    dtype = base.meta["val"].dtype
    if any(n.meta["val"].dtype != dtype for n in [operand, *views]):
        return None
    r = base
    with graph.inserting_before(before):
        for view in reversed(views):
            r = graph.call_function(view.target, (r, *view.args[1:]), dict(view.kwargs))
            r.meta = dict(view.meta)
    return r


def abs_max_node(graph: fx.Graph, x: fx.Node, dim: int, before: fx.Node) -> fx.Node:
    """amax(|x|, dim) (dim 1: of every row; 0: of every column), inserted before `before`: plain
    ops, for Inductor to fuse into x's own kernel where it can."""
    with graph.inserting_before(before):
        absolute = call(graph, aten.abs.default, x)
        abs_max = call(graph, aten.amax.default, absolute, [dim])
    for node in (absolute, abs_max):
        node.meta = {**x.meta, "val": node.meta["val"]}
    return abs_max


def nonzero_count_node(graph: fx.Graph, x: fx.Node, dim: int, before: fx.Node) -> fx.Node:
    """The number of nonzeros along `dim` of x (dim 0: of every column), inserted before `before`:
    one reduction Inductor generates, where the op counting them itself would first write a
    boolean tensor the size of x."""
    with graph.inserting_before(before):
        return call(graph, aten.sum.dim_IntList, call(graph, aten.ne.Scalar, x, 0), [dim])


def erase_unused(graph: fx.Graph, operand: fx.Node, sparse: fx.Node) -> None:
    """Erase `operand` (views and casts of the square of the sparse relu), then what it read, up
    to the sparse relu, while nothing reads them anymore."""
    node = operand
    while node.op == "call_function" and not node.users:
        up = node.args[0]
        graph.erase_node(node)
        if node is sparse:
            return
        node = up
