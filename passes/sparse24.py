"""sparse24: 2:4 activation sparsity for Squared-ReLU FFNs (after arXiv 2503.16672).

A Squared-ReLU FFN computes `Y = relu(X W1ᵀ)² W2ᵀ`. Its activations are mostly zero, so keeping
the 2 largest of every 4 along the hidden dimension loses almost nothing, and the second matmul
can then run on 2:4 sparse tensor cores. This pass finds the pattern in the joint forward+backward
graph (Inductor's `joint_custom_pre_pass`) and rewrites it. It changes numerics: it runs only when
named (`passes=["sparse24"]` or `passes=[Sparse24(...)]`).

What it matches, as AOTAutograd leaves it (`F.relu(x) ** 2`, `torch.square(F.relu(x))`,
`x.relu().pow(2)`, `nn.ReLU` then `.square()` all become `pow.Tensor_Scalar(relu, 2)`; `r * r`
becomes `mul.Tensor(r, r)`):

    h ─ relu ─[casts, views]─ pow(·, 2) | mul(r, r) ─[casts, views]─ mm(·, W2ᵀ) | addmm(b, ·, W2ᵀ)

Casts (autocast puts `pow` in fp32) and views that keep the elements in order (3-D tokens
flattened for the matmul; an in-place `F.relu(h, inplace=True)` or `nn.ReLU(inplace=True)`, which
functionalization turns into relu and views back; einsum's unsqueezes and permutes of size-1 dims)
may sit in between, as long as the matmul reduces over the hidden dim. A linear written as an einsum
(`torch.einsum("btf,df->btd", a, w)`) reaches the graph as a bmm of batch 1: the pass sees those as
mms while it matches (passes/bmm_as_mm.py) and puts back every one it did not rewrite; their weight
gradients come as Aᵀ·dY, not dYᵀ·A, and are rewritten as well. Dropout between relu² and the
matmul (T5's and Primer's FFN) keeps the site: it only zeros more entries, so its output is still
2:4 and the matmul reads it as it is; a factor computed from the model's activations (a relu²-GLU's
gate) does not, and the site is skipped with the reason. Other spellings of the same
function match too: `torch.clamp(h, min=0)` (`clamp_min(h, 0)`, whose gradient reads h, not r: the
square's `2r` factor still zeroes the dropped entries) and `torch.relu(h) * torch.relu(h)` (two relu
nodes of one input, merged into one; dH is then the sum of their two gradients). Every use of the
relu and of its square in the forward must be part of the pattern; uses that only compute gradients
are fine. A square of anything else (RMSNorm's `x²`) and a relu that is not squared are reported as
skipped with the reason; GELU/SiLU/SwiGLU FFNs have neither and are left alone.

Why the relu node is what gets replaced. The rewrite is `relu(h) -> fvcompile.sparse24_relu(h)`
(relu, then keep the 2 largest of every 4 along the hidden dim). Squaring is monotone on relu's
output, so the 2 largest of relu(h)² are the 2 largest of relu(h): squaring the sparse relu gives
exactly the 2:4-sparse relu². And because the joint graph's backward is written in terms of the
relu node's output r (the square's gradient `2 * r * grad` and relu's gradient
`where(le(r, 0), 0, ·)`), those formulas, now reading the sparse r, are exactly the gradient of the
sparse function (the mask is piecewise constant): forward and backward change together and stay
consistent, with no custom autograd in the graph.

The four backward matmuls of the FFN, with H = X W1ᵀ, A = mask ⊙ relu(H)² (the 2:4 activation),
Y = A W2ᵀ, dA = dY W2 and dH = 2 · relu_s(H) ⊙ dA (zero wherever the sparse relu is zero):

| matmul                 | what it is                          | here                                   |
|------------------------|-------------------------------------|----------------------------------------|
| dA = dY · W2           | input gradient of the 2nd linear    | dense                                   |
| dW2 = dYᵀ · A          | weight gradient of the 2nd linear   | dense, with the masked A (default); or |
|                        |                                     | sparse: A 2:4 along tokens (option)    |
| dX = dH · W1           | input gradient of the 1st linear    | sparse: dH is 2:4 along the hidden dim |
| dW1 = dHᵀ · X          | weight gradient of the 1st linear   | dense; or sparse: dH 2:4 along tokens, |
|                        |                                     | its 5% densest features whole ("all")  |

dH inherits the forward mask, and the hidden dim is dX's reduction dim, so dX is a 2:4 sparse
matmul with no further approximation. dW2 reduces over tokens: the forward's per-row mask gives
no 2:4 structure along that dim. By default dW2 stays dense with the masked A, which makes every
gradient here the exact gradient of the sparse forward (the reference the tests check against),
at the price of that matmul's speedup. `Sparse24(sparse_weight_grad=True)` follows the paper
instead: a second 2:4 selection of A along the tokens (the 2 largest of every 4 tokens, per
hidden unit) makes dW2 = dYᵀ · S_tokens(A) a sparse matmul too, an approximation of that one
gradient (its reference: the same formula in plain PyTorch). The tokens are grouped strided, t with
t + T/4, t + T/2 and t + 3T/4, T padded with zero tokens to a multiple of 64 (`sparse24_mm(strided_k=True)`;
the pack kernel reads them in place, so any token count runs sparse),
not as neighbours: neighbouring tokens are alike, and dropping 2 of 4 alike tokens loses more. In
the CPU study that took the sparse dW2 from +0.67% to -0.13% held-out loss
(bench/results/sparse24_backward_study_cpu_2026-11-27.json), as the paper's token permutation does.
Without it, at most 2 of the FFN's 6 matmuls are sparse, so fwd+bwd cannot reach the paper's 1.3x
even with perfect kernels (at 2x per sparse matmul: 6 / 5 = 1.2x); with it, 3 of 6 (6 / 4.5 =
1.33x). On an H100 or H200 in bf16
the 2:4 matmul is ~1.5x faster than the dense one, not 2x: the bounds are 1.07x-1.08x and 1.12x
(bench/README.md). A token-wise sparse dW1 as well cost 10.7% training loss with neighbouring
tokens grouped, and 2.1% strided (1.5%-1.7% with the 5% densest features left dense;
bench/diag/sparse24_backward_study.py): `Sparse24(sparse_weight_grad="all")` builds that last one, so
that all four sparse-able matmuls are sparse (`sparse24_mm(dense_rows=0.05)` multiplies the densest
features whole, a small dense matmul after the sparse one).

Devices. On a GPU where a one-time probe of the 2:4 sparse matmul succeeds
(`fvcompile.kernels.sparse24_backends.sparse_tensor_cores_available`) and the activation is fp16/bf16, the
forward matmul consuming A and the backward matmul consuming dH become `fvcompile.sparse24_mm`.
The forward one reads r and squares as it packs (A = r² is never written for it); in an inference
graph it reads h itself and the sparse relu disappears: relu, 2:4 selection, square and packing
are one memory pass before the sparse matmul.
Elsewhere (CPU, older GPUs, fp32) the pass runs the emulated path: only the relu is replaced and
the matmuls stay dense on the masked tensors (the same numbers, no speedup), and the result's
notes say so; `Sparse24(emulate=False)` leaves such sites dense instead. `sparse_mm=True` forces
the `sparse24_mm` rewrite anywhere (it then emulates at run time): useful for inspecting and
testing the full rewrite on CPU. The hidden width must be a multiple of 64 (the sparse matmul's
alignment) on every device, so that the emulation never makes a site sparse that the GPU could
not; token counts are free (dynamic shapes work; the kernels pad rows).

FP8 (`fp8=True`), the paper's path: all six FFN matmuls in float8_e4m3fn. The 2:4 sparse ones
(forward, dX, and dW2/dW1 with `sparse_weight_grad`) scale the sparse operand per row and the
dense one per tensor, the product scaled back by both (in cuSPARSELt's epilogue where the probe
finds that right; `kernels/sparse24_fp8.py` defines the formula, which is also the reference and
the emulation). The row maxima behind those scales are not read again where the graph has them:
in training the selection (`sparse24_relu_max`) also returns r's row maxima (the forward matmul's
scales) and column maxima (the sparse dW2's), and dX's and the sparse dW1's are `amax`es over dH's
rows and columns in the graph, for Inductor to fuse where it can (the same numbers: a row's
maximum is always kept). The matmuls left dense (h = X W1ᵀ, dA = dY W2, and dW1 and dW2 where they
are not sparse) run FP8 with row-wise scales (`fp8_rowwise_mm`, passes/fp8_matmuls.py): first
measured on an H200, the FFN with only its sparse matmuls in FP8 ran 1.08x-1.10x against bf16
dense while the dense FFN with all six in FP8 ran 1.33x, so FP8 for the sparse matmuls alone
cannot win. Every other op keeps the model's dtype, and gradients pass straight through the
quantization. Quantization on top of sparsity is measured against both: the training study's loss,
and speed against the bf16 dense FFN and against the dense FFN with all six matmuls in FP8
(bench/fp8_dense.py, the same row-wise formula). The FP8 2:4 matmul needs Hopper (cuSPARSELt; a
probe checks it); elsewhere the rewritten matmuls emulate the FP8 numbers.

Dense warm-up (`warmup_steps=N`). The rewritten ops get a schedule: a key per site (this pass
object's token, the module path and the site's index in it), N, and whether the op counts a step.
In a training (joint) graph the site's `sparse24_relu` counts one step per forward call; the
site's `sparse24_mm`s (forward and backward) and its ops in inference graphs read the step count.
Step i runs dense while i < N (`fvcompile.kernels.sparse24._in_dense_warmup`). A "step" is a
forward call of the compiled training graph: with gradient accumulation, count micro-batches. The
counter lives in this Python process and is read by the ops at run time (they are opaque to
Inductor), so it does not survive a restart and cannot run under CUDA graphs (the pass says so
with an error: a replayed graph would never leave, or never enter, the warm-up). The token is
part of the uuid when N > 0, so a second `Sparse24(warmup_steps=N)` never reuses the first one's
compiled graph (and its counters) from Inductor's cache. Under activation checkpointing the counting
op is marked to be saved, not recomputed in the backward (which would count a step twice and could
recompute r sparse where the forward ran dense): with a warm-up, r stays in memory.
"""
from __future__ import annotations

import operator
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._inductor import config as inductor_config
from torch.utils.checkpoint import CheckpointPolicy

from fvcompile.kernels import sparse24 as k24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.passes import bmm_as_mm, fp8_matmuls
from fvcompile.passes.bmm_as_mm import keeps_order
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site, call, module_path

aten = torch.ops.aten
prims = torch.ops.prims
fvc = torch.ops.fvcompile

CASTS = {prims.convert_element_type.default, aten._to_copy.default, aten.alias.default}


@dataclass
class Match:
    relu: fx.Node
    square: fx.Node
    matmuls: list[fx.Node] = field(default_factory=list)  # forward mm/addmm consuming relu²
    hidden: Any = None


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


def _hidden_kept(node: fx.Node, hidden) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[-1] == hidden


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _is_square_of(node: fx.Node, base: fx.Node) -> bool:
    if node.target == aten.pow.Tensor_Scalar:
        return node.args[0] is base and node.args[1] == 2
    if node.target == aten.mul.Tensor:
        return node.args[0] is base and node.args[1] is base
    return node.target == aten.square.default and node.args[0] is base


def _is_square(node: fx.Node) -> bool:
    return node.op == "call_function" and len(node.args) >= 1 and isinstance(node.args[0], fx.Node) \
        and _is_square_of(node, node.args[0])


def _passes_values(node: fx.Node) -> bool:
    """A cast, or a view whose elements in row-major order are its input's in the same order
    (`keeps_order`: reshapes, unsqueezes, einsum's permutes of size-1 dims): node holds the
    values of its input, in the same places once flattened to rows of the hidden width."""
    return node.op == "call_function" and (node.target in CASTS or keeps_order(node))


def _depends_on_no_input(node: fx.Node) -> bool:
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


def _keeps_zeros(user: fx.Node, cur: fx.Node) -> bool:
    """`cur` times (or over) a number, or times a tensor of the graph's own randomness (dropout's
    mask): zero wherever `cur` is, same shape, so a 2:4 `cur` stays 2:4. A factor computed from the
    model's activations (a GLU's gate) is not taken: the 2:4 choice would then ignore it."""
    if user.target in (aten.div.Tensor, aten.div.Scalar):
        return user.args[0] is cur and isinstance(user.args[1], (int, float))
    if user.target not in (aten.mul.Tensor, aten.mul.Scalar) or len(user.args) != 2 or cur not in user.args:
        return False
    other = user.args[1] if user.args[0] is cur else user.args[0]
    if isinstance(other, (int, float)):
        return True
    return (isinstance(other, fx.Node) and other is not cur and _same_shape(user, cur)
            and _depends_on_no_input(other))


def _forward_uses(node: fx.Node, grad: set[fx.Node], keeping_zeros: bool = False) -> list[tuple[fx.Node, fx.Node]]:
    """The (user, input) pairs where `node`'s values, followed through casts and order-keeping
    views (`_passes_values`), are used in the forward (users in `grad` are skipped); with
    `keeping_zeros`, also through scalings that keep its zeros (`_keeps_zeros`: dropout)."""
    terminals, todo = [], [node]
    while todo:
        cur = todo.pop()
        for user in cur.users:
            if user in grad:
                continue
            passes = (_passes_values(user) and user.args[0] is cur) or (keeping_zeros and _keeps_zeros(user, cur))
            # copy(dst, cur) into a buffer of cur's shape holds cur's values (functionalized in-place ops)
            passes = passes or (user.target == aten.copy.default and user.args[1] is cur
                                and _same_shape(user, cur))
            if passes:
                todo.append(user)
            else:
                terminals.append((user, cur))
    return terminals


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})" if node.op == "call_function" else node.name


def _is_relu(node: fx.Node) -> bool:
    """relu(x), or a spelling of it: clamp_min(x, 0), clamp(x, 0) (`torch.clamp(x, min=0)`)."""
    if node.op != "call_function":
        return False
    if node.target == aten.clamp_min.default:
        return node.args[1] == 0
    if node.target == aten.clamp.default:
        return len(node.args) >= 2 and node.args[1] == 0 and (len(node.args) < 3 or node.args[2] is None) \
            and node.kwargs.get("max") is None
    return node.target == aten.relu.default


def _merge_twin_relus(graph: fx.Graph, grad: set[fx.Node]) -> None:
    """`relu(h) * relu(h)`, two relu nodes of one input, becomes `r * r` (exact: the same values;
    each relu's gradient formula then reads the one left)."""
    for mul in list(graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        a, b = mul.args[:2]
        if (mul not in grad and isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b
                and _is_relu(a) and _is_relu(b) and a.args[0] is b.args[0] and a not in grad and b not in grad):
            b.replace_all_uses_with(a)
            graph.erase_node(b)


def _relu_input(sparse: fx.Node) -> fx.Node:
    """h, for the sparse relu r = sparse24_relu(h) or r = sparse24_relu_max(h)[0]."""
    return sparse.args[0].args[0] if sparse.target is operator.getitem else sparse.args[0]


def _relu_grad_nodes(relu: fx.Node) -> list[fx.Node]:
    """The relu-gradient nodes, dH: `where(le(r, 0), 0, g)` or `threshold_backward(g, r, 0)` reading
    the relu's output r (or an alias or view of it: an in-place relu's gradient reads a view), or
    `where(ge(h, 0), g, 0)` reading its input h (clamp_min's gradient)."""
    readers, todo = [], [relu]
    while todo:  # r, its aliases and views
        cur = todo.pop()
        readers.append(cur)
        todo += [u for u in cur.users if (u.target == aten.alias.default or keeps_order(u)) and u.args[0] is cur]
    found = []
    for r in readers:
        for u in r.users:
            if u.target == aten.threshold_backward.default and u.args[1] is r:
                found.append(u)
            elif u.target == aten.le.Scalar and u.args[0] is r and u.args[1] == 0:
                found += [w for w in u.users if w.target == aten.where.self and w.args[0] is u]
    for u in _relu_input(relu).users:
        if u.target == aten.ge.Scalar and u.args[1] == 0:
            found += [w for w in u.users if w.target == aten.where.self and w.args[0] is u]
    return found


def _dh_nodes(relu: fx.Node) -> list[fx.Node]:
    """dH, the relu's gradient (one node, or the sum of two for merged twin relus)."""
    found = _relu_grad_nodes(relu)
    # relu(h) * relu(h), its twin relus merged into one: each had a gradient, and dH is their sum.
    sums = {u for w in found for u in w.users
            if u.target == aten.add.Tensor and all(a in found for a in u.args[:2])}
    return list(sums) + [w for w in found if not any(u in sums for u in w.users)]


def _dh_users(sparse: fx.Node, hidden) -> list[tuple[fx.Node, fx.Node]]:
    """(user, dH or its view) for every user of dH, relu's gradient read from the sparse relu:
    where the backward's dX and dW1 matmuls are found."""
    return [(user, src) for node in _dh_nodes(sparse) for user, src in _forward_uses(node, set())
            if _hidden_kept(src, hidden)]


def _squares_and_gradients(graph: fx.Graph) -> set[fx.Node]:
    """Every relu's squares and gradients, and what their values reach (through views and
    dropout): the tensors whose einsum matmuls may be a site's."""
    found = set()
    for relu in (n for n in graph.nodes if _is_relu(n)):
        for node in _dh_nodes(relu):
            found.update([node, *(src for _, src in _forward_uses(node, set()))])
        for square in (u for u, src in _forward_uses(relu, set()) if _is_square_of(u, src)):
            found.update([square, *(src for _, src in _forward_uses(square, set(), keeping_zeros=True))])
    return found


def _same_views(graph: fx.Graph, operand: fx.Node, square: fx.Node, base: fx.Node,
                before: fx.Node) -> fx.Node | None:
    """`operand` = views(casts(square(casts(r)))) for the sparse relu r: the same views of `base`
    (r, or relu's input h) inserted before `before`, so that a sparse matmul can read `base` and
    square as it packs (r² is then never written out). None where that would change the numbers:
    `base` in another dtype than `operand` (squaring in that dtype would round differently)."""
    views, cur = [], operand
    while cur is not square:
        if not _passes_values(cur):
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


def _token_contractions(s: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """The matmuls contracting s (tokens, hidden) over its tokens, a weight gradient, as (mm, its
    other operand): written gᵀ·s (nn.Linear's dW) or sᵀ·g (einsum's)."""
    found = []
    for user in s.users:
        if user.target == aten.mm.default and user.args[1] is s and user.args[0] is not s:
            found.append((user, user.args[0]))
        elif user.target == aten.permute.default and user.args[0] is s and list(user.args[1]) == [1, 0]:
            found += [(mm, mm.args[1]) for mm in user.users
                      if mm.target == aten.mm.default and mm.args[0] is user and mm.args[1] is not user]
    return found


def _producer_mm(x: fx.Node) -> fx.Node | None:
    """The mm/addmm whose values x holds (through casts and order-keeping views): h's linear."""
    while _passes_values(x):
        x = x.args[0]
    return x if x.op == "call_function" and x.target in (aten.mm.default, aten.addmm.default) else None


def _input_grad_mms(b: fx.Node) -> list[fx.Node]:
    """The backward matmuls dY · bᵀ of a forward mm(a, b), as AOTAutograd writes them: mm(dY,
    permute(b)) (the FFN's dA = dY · W2)."""
    return [mm for t in b.users if t.target == aten.permute.default and list(t.args[1]) == [1, 0]
            for mm in t.users if mm.target == aten.mm.default and mm.args[1] is t]


def _transposed(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """xᵀ: the input of x where x is a transpose already, else a permute inserted here."""
    if x.op == "call_function" and x.target == aten.permute.default and list(x.args[1]) == [1, 0]:
        return x.args[0]
    t = graph.call_function(aten.permute.default, (x, [1, 0]))
    t.meta = {**x.meta, "val": x.meta["val"].t()}
    return t


def _abs_max_node(graph: fx.Graph, x: fx.Node, dim: int, before: fx.Node) -> fx.Node:
    """amax(|x|, dim) (dim 1: of every row; 0: of every column), inserted before `before`: ops
    for Inductor to fuse into x's own kernel where it can. On CPU (torch 2.13) it does not where x
    also feeds a matmul, as dH does: x's layout is then fixed and its loop flattened, so the
    maxima read x once more. On an H200 (torch 2.11) Triton does: dH and its row maxima are one
    kernel, 0.26 ms at 8192 tokens (the FP8 profile of bench/sparse24.py, 2026-11-27)."""
    with graph.inserting_before(before):
        absolute = graph.call_function(aten.abs.default, (x,))
        abs_max = graph.call_function(aten.amax.default, (absolute, [dim]))
    absolute.meta = {**x.meta, "val": aten.abs.default(x.meta["val"])}
    abs_max.meta = {**x.meta, "val": aten.amax.default(absolute.meta["val"], [dim])}
    return abs_max


def _nonzero_count_node(graph: fx.Graph, x: fx.Node, dim: int, before: fx.Node) -> fx.Node:
    """The number of nonzeros along `dim` of x (dim 0: of every column), inserted before `before`:
    one reduction for Inductor to generate (sparse24_mm counting them itself made a boolean tensor
    the size of x, then summed it: ~0.9 ms at 8192 tokens on an H200, inferred from its profile)."""
    with graph.inserting_before(before):
        return call(graph, aten.sum.dim_IntList, call(graph, aten.ne.Scalar, x, 0), [dim])


def _erase_unused(graph: fx.Graph, square: fx.Node, sparse: fx.Node) -> None:
    """Erase the square, the casts before it and the sparse relu where nothing reads them anymore."""
    node = square
    while node.op == "call_function" and not node.users:
        up = node.args[0]
        graph.erase_node(node)
        if node is sparse:
            return
        node = up


DENSE_FEATURES = 0.05  # of dW1's rows (features), the densest, multiplied whole (the paper's split)


class Sparse24(GraphPass):
    name = "sparse24"
    hook = "joint"
    exact = False
    helpers = (bmm_as_mm, fp8_matmuls)

    def __init__(self, emulate: bool = True, warmup_steps: int = 0, sparse_mm: bool | None = None,
                 sparse_weight_grad: bool | str = False, fp8: bool = False):
        """emulate: on devices without 2:4 sparse tensor cores run the masked-dense emulation
            (True) or leave the sites dense (False).
        warmup_steps: training steps to run dense before switching to 2:4.
        sparse_mm: None rewrites the matmuls into `sparse24_mm` where the device has sparse
            tensor cores; True everywhere (emulated at run time); False nowhere.
        sparse_weight_grad: True (or "dW2"): also make dW2 = dYᵀ·A a 2:4 matmul, with a second
            selection of A along the token dim, tokens grouped strided (the paper's approximation
            of that gradient; off: exact). "all": dW1 = dHᵀ·X as well, the same way, with the 5%
            densest features of dH kept whole (all four sparse-able matmuls sparse).
        fp8: run the FFN's matmuls in float8_e4m3fn: the 2:4 ones with the sparse operand
            scaled per row and the dense one per tensor (the paper's FP8 path;
            kernels/sparse24_fp8.py), the others dense with row-wise scales. The matmuls are then
            rewritten on every device, emulated where there is no FP8 2:4 matmul.
        """
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.emulate = emulate
        self.warmup_steps = int(warmup_steps)
        self.sparse_mm = sparse_mm
        if sparse_weight_grad not in (False, True, "dW2", "all"):
            raise ValueError(f"sparse_weight_grad must be False, True, 'dW2' or 'all', got {sparse_weight_grad!r}")
        self.sparse_weight_grad = sparse_weight_grad
        self.fp8 = fp8
        self.schedule_token = uuidlib.uuid4().hex[:12] if self.warmup_steps else ""

    def options(self) -> dict[str, Any]:
        opts = {"emulate": self.emulate, "warmup_steps": self.warmup_steps, "sparse_mm": self.sparse_mm,
                "sparse_weight_grad": self.sparse_weight_grad, "fp8": self.fp8}
        if self.warmup_steps:
            opts["schedule_token"] = self.schedule_token
        return opts

    def pays_off_on(self, device: torch.device) -> bool:
        return backends.sparse_tensor_cores_available(device)

    # -- matching ---------------------------------------------------------------------------

    def _match(self, relu: fx.Node, grad: set[fx.Node]) -> Match | str | None:
        """The pattern rooted at `relu`, the reason it does not fit, or None: not a site."""
        hidden = relu.meta["val"].shape[-1] if isinstance(relu.meta.get("val"), torch.Tensor) else None
        # Views may sit between relu and square: an in-place relu (`F.relu(h, inplace=True)`,
        # `nn.ReLU(inplace=True)`) reaches the graph as relu, then views back to h's shape.
        terminals = _forward_uses(relu, grad)
        squares = [u for u, src in terminals if _is_square_of(u, src)]
        others = [u for u, src in terminals if not _is_square_of(u, src)]
        if not squares:  # a clamp(min=0) not squared is no site at all (box coordinates, losses, ...)
            return "relu is not squared (a plain ReLU)" if relu.target == aten.relu.default else None
        if others or len(squares) > 1:
            extra = (others + squares[1:])[0]
            return f"relu output is also used by {_describe(extra)}"
        square = squares[0]
        # Dropout may sit between relu² and the matmul: its zeros keep 2:4 what is 2:4.
        consumers = _forward_uses(square, grad, keeping_zeros=True)
        if not consumers:
            return "relu² not consumed by a matmul (no forward use)"
        matmuls = []
        for user, src in consumers:
            is_mm = user.target == aten.mm.default and user.args[0] is src and user.args[1] is not src
            is_addmm = (user.target == aten.addmm.default and user.args[1] is src
                        and user.args[2] is not src and not user.kwargs)
            if not (is_mm or is_addmm):
                return f"relu² not consumed by a matmul (used by {_describe(user)})"
            if isinstance(hidden, int) and not _hidden_kept(src, hidden):
                return f"relu² reaches {_describe(user)} reshaped: the matmul does not reduce over the hidden dim"
            matmuls.append(user)
        if not isinstance(hidden, int):
            return "hidden width is dynamic"
        if hidden % k24.ALIGN_K:
            return (f"hidden width {hidden} is not a multiple of {k24.ALIGN_K} "
                    "(the 2:4 sparse matmul's alignment)")
        return Match(relu, square, matmuls, hidden)

    # -- rewriting --------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.warmup_steps and ctx.device.type == "cuda" and inductor_config.triton.cudagraphs:
            # A replayed graph skips the ops' host code, where the warm-up counts its steps.
            raise ValueError(
                f"Sparse24(warmup_steps={self.warmup_steps}) cannot run under CUDA graphs "
                "(mode='reduce-overhead'): the warm-up counts steps on the host, which a graph replay "
                "skips. Compile without CUDA graphs for the warm-up's steps, or use warmup_steps=0.")
        graph = gm.graph
        result = PassResult()
        _merge_twin_relus(graph, gradient_only_nodes(graph))
        # einsum's batch-1 bmms of relu² and dH as the mms they are, put back where not rewritten.
        einsum_mms = bmm_as_mm.as_mm(graph, _squares_and_gradients(graph))
        grad = gradient_only_nodes(graph)
        has_cores = backends.sparse_tensor_cores_available(ctx.device)
        has_fp8 = self.fp8 and backends.fp8_sparse_mm_available(ctx.device)
        cslt = has_cores and backends.sparse_mm_backend(ctx.device) == "cusparselt"  # host cost per call (below)
        training = ctx.graph_kind == "joint"
        matched_squares: set[fx.Node] = set()
        sites_per_module: dict[str, int] = {}
        emulated = 0

        for relu in [n for n in graph.nodes if _is_relu(n)]:
            if relu in grad:
                continue  # a relu computing gradients is no activation
            module = module_path(relu)
            found = self._match(relu, grad)
            if found is None:
                continue
            if isinstance(found, str):
                result.skipped.append(Site(relu.name, module, found))
                continue
            matched_squares.add(found.square)
            if not ctx.module_allowed(module):
                result.skipped.append(Site(relu.name, module, "excluded by module filter"))
                continue
            dtype = found.matmuls[0].meta["val"].dtype  # what the matmul would pack
            on_cores = has_cores and dtype in k24.PACK_DTYPES and (not self.fp8 or has_fp8)
            if not on_cores and not self.emulate:
                why = (backends.no_sparse_mm_reason(ctx.device) if not has_cores
                       else f"{dtype} has no 2:4 sparse matmul (needs fp16/bf16)" if dtype not in k24.PACK_DTYPES
                       else f"no FP8 2:4 sparse matmul on {ctx.device}")
                result.skipped.append(Site(relu.name, module, f"{why} and emulate=False: left dense"))
                continue
            emulated += not on_cores

            index = sites_per_module.get(module, 0)
            sites_per_module[module] = index + 1
            schedule = (f"{self.schedule_token}:{module or relu.name}#{index}", self.warmup_steps) \
                if self.warmup_steps else ("", 0)
            detail = self._rewrite(graph, found, schedule, training,
                                   use_mm=self.sparse_mm or (self.sparse_mm is None and (on_cores or self.fp8)))
            if self.fp8:
                detail += "; the 2:4 matmuls in FP8 e4m3 (the sparse operand scaled per row, the dense one per tensor)"
                if on_cores:
                    detail += (", the scales applied in cuSPARSELt's epilogue" if backends.fp8_scales_in_matmul(ctx.device)
                               else ", the scales applied by a pass after the matmul (cuSPARSELt's epilogue "
                                    "failed its probe here)")
            if not on_cores:
                detail += f" (emulated on {ctx.device.type}: dense matmuls of the masked tensors)"
            result.rewritten.append(Site(found.relu.name, module, detail))

        self._report_other_squares(graph, grad, matched_squares, result)
        bmm_as_mm.as_bmm(graph, einsum_mms)
        if emulated:
            where = (backends.no_sparse_mm_reason(ctx.device) if not has_cores
                     else f"no FP8 2:4 sparse matmul on {ctx.device}" if self.fp8 and not has_fp8
                     else "the activations are not fp16/bf16")
            result.notes.append(f"emulated: {where}; {emulated} site(s) run the 2:4 masked-dense "
                                "path (same numerics as the sparse matmul, no speedup)")
        if cslt and len(result.rewritten) > emulated and not inductor_config.triton.cudagraphs:  # sites on cores
            result.notes.append(
                "host cost: torch._cslt_sparse_mm sets up its cuSPARSELt plan on every call (~0.4 ms of host "
                "time each, ~0.9 ms with FP8's scaling; H200): at a few thousand tokens the FFN waits on the "
                "host; mode='reduce-overhead' (CUDA graphs) takes that out")
        if self.warmup_steps and result.rewritten:
            result.notes.append(f"dense warm-up: the first {self.warmup_steps} training steps run dense")
        return result

    def _rewrite(self, graph: fx.Graph, m: Match, schedule: tuple[str, int], training: bool,
                 use_mm: bool) -> str:
        key, dense_steps = schedule
        relu = m.relu
        first = _producer_mm(relu.args[0])  # h = X W1ᵀ
        operands = [(mm.args[0], mm.args[1]) if mm.target == aten.mm.default else mm.args[1:3] for mm in m.matmuls]
        args = (relu.args[0], key, dense_steps, training and bool(key))
        # FP8 training: the selection also yields r's row and column maxima, the FP8 scales of the
        # forward matmul (rows) and of the sparse dW2 (columns), so that neither reads r for them.
        row_max = col_max = None
        with graph.inserting_before(relu):
            if training and self.fp8 and use_mm:
                both = graph.call_function(fvc.sparse24_relu_max.default, args)
                both.meta = {**relu.meta, "val": fvc.sparse24_relu_max.default(relu.args[0].meta["val"], *args[1:])}
                sparse, row_max, col_max = (graph.call_function(operator.getitem, (both, i)) for i in range(3))
                for i, node in enumerate((sparse, row_max, col_max)):
                    node.meta = {**relu.meta, "val": both.meta["val"][i]}
            else:
                sparse = graph.call_function(fvc.sparse24_relu.default, args)
                sparse.meta = dict(relu.meta)
        if training and key:
            # This op counts the warm-up's steps: activation checkpointing must not recompute it in
            # the backward, which would count each step twice and could select where the forward
            # ran dense. Its outputs are saved instead (r costs the memory checkpointing would save);
            # with FP8 maxima, the op and its three outputs are all marked.
            for node in (sparse,) if row_max is None else (sparse.args[0], sparse, row_max, col_max):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        relu.replace_all_uses_with(sparse)
        graph.erase_node(relu)
        done = ["relu -> sparse24_relu" + ("_max (r, and its row and column maxima for FP8)" if row_max else "")]
        if training and self.sparse_weight_grad:  # True, "dW2" or "all"
            done += self._sparse_weight_grad(graph, m, sparse, key, dense_steps, self.fp8, col_max)
        if training and self.sparse_weight_grad == "all":
            done += self._sparse_dw1(graph, sparse, m.hidden, key, dense_steps, self.fp8)
        if not use_mm:
            return "; ".join(done)

        # The forward matmul reads r and squares as it packs (r² never written); in an inference
        # graph, where nothing else needs r, it reads h itself: relu, 2:4, square and pack in one pass.
        base = sparse if training else sparse.args[0]
        fused = 0
        for mm in m.matmuls:
            operand = mm.args[0] if mm.target == aten.mm.default else mm.args[1]
            views = _same_views(graph, operand, m.square, base, mm)
            fused += views is not None
            self._to_sparse_mm(graph, mm, key, dense_steps, self.fp8, of_relu=views, from_h=not training,
                               a_max=row_max if views is not None else None)
        if not training:
            _erase_unused(graph, m.square, sparse)
        how = " (reads r, squares as it packs)" if training else " (reads h: relu, 2:4, square, pack in one pass)"
        done.append(f"{len(m.matmuls)} forward matmul(s) -> sparse24_mm" + (how if fused == len(m.matmuls) else ""))
        # Backward: dX = dH · W1, with dH = relu's gradient (2:4 along the hidden dim, K here).
        dx = [u for u, src in _dh_users(sparse, m.hidden)
              if u.target == aten.mm.default and u.args[0] is src and u.args[1] is not src] if training else []
        for mm in dx:
            # FP8: dH's row maxima in the graph, where Inductor can fuse them into dH's own kernel.
            a_max = _abs_max_node(graph, mm.args[0], 1, mm) if self.fp8 else None
            self._to_sparse_mm(graph, mm, key, dense_steps, self.fp8, a_max=a_max)
        if dx:
            done.append("dX matmul -> sparse24_mm")
        if self.fp8:
            done.append(self._dense_to_fp8(graph, first, operands, sparse, m.hidden, training))
        return "; ".join(done)

    @staticmethod
    def _dense_to_fp8(graph: fx.Graph, first: fx.Node | None, operands: list, sparse: fx.Node, hidden,
                      training: bool) -> str:
        """The FFN's matmuls left dense, into FP8 with row-wise scales (passes/fp8_matmuls.py): h's
        linear, and in training dA = dY · W2 and whichever of dW1 and dW2 are not 2:4 sparse. FP8
        is not warmed up: during a dense warm-up the FFN runs dense in FP8 (kernels/sparse24_mm.py)."""
        dense = [first] if first is not None else []
        if training:
            for a, b in operands:
                dense += _input_grad_mms(b) + [mm for mm, _ in _token_contractions(a)]  # dA; dW2 if dense
            for d_h in dict.fromkeys(src for _, src in _dh_users(sparse, hidden)):
                dense += [mm for mm, _ in _token_contractions(d_h)]  # dW1 if dense
        dense = list(dict.fromkeys(dense))
        left = [why for mm in dense if (why := fp8_matmuls.to_fp8(graph, mm))]
        converted = len(dense) - len(left)
        if first is None:
            left.append("h's own linear, not an mm/addmm (an einsum's bmm, say)")
        return (f"{converted} dense matmul(s) in FP8 (row-wise scales, _scaled_mm)"
                + (f"; left as they were: {'; '.join(left)}" if left else ""))

    @staticmethod
    def _sparse_dw1(graph: fx.Graph, sparse: fx.Node, hidden, key: str, dense_steps: int, fp8: bool) -> list[str]:
        """dW1 = dHᵀ·X -> sparse24_mm(permute(dH), X): dHᵀ 2:4-selected along its last dim, the
        tokens (grouped strided), its 5% densest rows (features) kept whole. FP8: the rows' maxima
        are dH's column maxima, from the graph (beside dX's row maxima, over the same dH)."""
        done = []
        for d_h in dict.fromkeys(src for _, src in _dh_users(sparse, hidden)):
            for mm, other in _token_contractions(d_h):
                transposed = mm.args[1] is d_h  # Xᵀ·dH (einsum's): (dHᵀ·X)ᵀ
                with graph.inserting_before(mm):
                    d_h_t = _transposed(graph, d_h) if transposed else mm.args[0]
                    x = _transposed(graph, other) if transposed else other
                    a_max = {"a_max": _abs_max_node(graph, d_h, 0, mm)} if fp8 else {}
                    d_w = graph.call_function(fvc.sparse24_mm.default, (d_h_t, x, key, dense_steps, True),
                                              {"transpose_out": transposed, "fp8": fp8, "strided_k": True,
                                               "dense_rows": DENSE_FEATURES, **a_max,
                                               "row_counts": _nonzero_count_node(graph, d_h, 0, mm)})
                d_w.meta = dict(mm.meta)
                mm.replace_all_uses_with(d_w)
                graph.erase_node(mm)
                done.append(f"dW1 matmul -> sparse24_mm (2:4 along tokens, {DENSE_FEATURES:.0%} densest features dense)")
        return done

    @staticmethod
    def _sparse_weight_grad(graph: fx.Graph, m: Match, sparse: fx.Node, key: str, dense_steps: int,
                            fp8: bool, col_max: fx.Node | None = None) -> list[str]:
        """dW2 = dYᵀ·A -> sparse24_mm(permute(A), dY, transpose_out=True): A's transpose is
        2:4-selected along its last dim, the tokens (the reduction dim of this matmul); the product
        comes out transposed, in the weight's own layout (einsum's Aᵀ·dY takes it as it is). Where
        A is r² (r the sparse relu), the op reads r and squares as it packs: A is never written."""
        done = []
        for fwd in m.matmuls:
            a = fwd.args[0] if fwd.target == aten.mm.default else fwd.args[1]
            for mm, other in _token_contractions(a):
                transposed = mm.args[1] is a  # dYᵀ·A = (Aᵀ·dY)ᵀ
                r = _same_views(graph, a, m.square, sparse, mm)
                with graph.inserting_before(mm):
                    a_t = _transposed(graph, a if r is None else r)
                    d_y = _transposed(graph, other) if transposed else other
                    # col_max (FP8): r's column maxima, the rows of rᵀ, from the selection's pass.
                    d_w = graph.call_function(fvc.sparse24_mm.default,
                                              (a_t, d_y, key, dense_steps, True, r is not None, False, transposed),
                                              {"fp8": fp8, "strided_k": True,
                                               **({"a_max": col_max} if r is not None and col_max else {})})
                d_w.meta = dict(mm.meta)
                mm.replace_all_uses_with(d_w)
                graph.erase_node(mm)
                done.append("dW2 matmul -> sparse24_mm (2:4 along tokens" + (", reads r)" if r is not None else ")"))
        return done

    @staticmethod
    def _to_sparse_mm(graph: fx.Graph, mm: fx.Node, key: str, dense_steps: int, fp8: bool,
                      of_relu: fx.Node | None = None, from_h: bool = False, a_max: fx.Node | None = None) -> None:
        """mm/addmm(a, b) -> sparse24_mm(a, b); given `of_relu` (r where a = r², or h where
        a = relu(h)² and from_h), sparse24_mm(of_relu, b, square=True[, relu=True]); a_max: the
        operand's row maxima, where the graph has them (FP8 scales)."""
        if mm.target == aten.addmm.default:
            bias, a, b = mm.args
        else:
            (a, b), bias = mm.args, None
        with graph.inserting_before(mm):
            # `a` is 2:4 already (relu² of the sparse relu, or dH): no second selection.
            args = (a, b, key, dense_steps, False) if of_relu is None else (
                of_relu, b, key, dense_steps, False, True, from_h)
            new = graph.call_function(fvc.sparse24_mm.default, args,
                                      {"fp8": fp8, **({"a_max": a_max} if a_max is not None else {})})
            new.meta = dict(mm.meta)
            if bias is not None:
                new = graph.call_function(aten.add.Tensor, (new, bias))
                new.meta = dict(mm.meta)
        mm.replace_all_uses_with(new)
        graph.erase_node(mm)

    @staticmethod
    def _report_other_squares(graph: fx.Graph, grad: set[fx.Node], matched: set[fx.Node],
                              result: PassResult) -> None:
        """Squares that are not of a relu (e.g. RMSNorm's x²): close to the pattern, not it."""
        for node in graph.nodes:
            if node.op != "call_function" or node in grad or node in matched or not _is_square(node):
                continue
            base = node.args[0]
            while _passes_values(base):
                base = base.args[0]
            if base.target == fvc.sparse24_relu.default:
                continue  # the square of a site this pass just rewrote
            if _is_relu(base):
                continue  # that relu was reported with its own reason
            what = getattr(base.target, "__name__", base.op).split(".")[0]
            result.skipped.append(Site(node.name, module_path(node),
                                       f"square of {what}, not of a relu (e.g. RMSNorm's x²)"))
