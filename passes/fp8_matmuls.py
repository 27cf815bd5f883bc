"""fp8_dense: a graph's dense matmuls in FP8 e4m3 with row-wise scales, the dense FP8 baseline.

`to_fp8(graph, mm)` rewrites one `mm`/`addmm` node into the ops of
`kernels/sparse24_fp8.fp8_rowwise_mm`: each operand scaled along K (a per row, b per column),
plain aten ops for the scales and the quantization, so that Inductor fuses them into the kernels
around them, and the product by `fvcompile::fp8_scaled_mm` (`_scaled_mm`, its scales passed 1-D).
`DenseFP8` is the pass that does it to every matmul of a graph, forward and backward (the
joint graph); `Sparse24(fp8=True)` calls `to_fp8` for the FFN matmuls it leaves dense.
Gradients pass straight through the quantization.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

from fvcompile.kernels.sparse24_fp8 import FP8, FP8_MAX, MIN_AMAX
from fvcompile.passes import graph_utils
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.passes.graph_utils import call, module_path, op_counts, op_delta, replace_node

aten = torch.ops.aten
prims = torch.ops.prims

ALIGN = 16  # _scaled_mm's K and N


def _quantize_rows(graph: fx.Graph, x: fx.Node) -> tuple[fx.Node, fx.Node]:
    """`quantize_rows(x)` as nodes: e4m3 values (row-major) and (M,) fp32 scales."""
    row_max = call(graph, aten.amax.default, call(graph, aten.abs.default, x), [1])
    scale = call(graph, prims.convert_element_type.default, row_max, torch.float32)
    scale = call(graph, aten.div.Tensor, call(graph, aten.clamp_min.default, scale, MIN_AMAX), FP8_MAX)
    x32 = call(graph, prims.convert_element_type.default, x, torch.float32)
    q = call(graph, aten.div.Tensor, x32, call(graph, aten.unsqueeze.default, scale, 1))
    # clamp(-448, 448) as Inductor's decompositions leave it (this graph is past them)
    q = call(graph, aten.clamp_max.default, call(graph, aten.clamp_min.default, q, -FP8_MAX), FP8_MAX)
    q = call(graph, prims.convert_element_type.default, q, FP8)
    return call(graph, aten.clone.default, q, memory_format=torch.contiguous_format), scale


def to_fp8(graph: fx.Graph, mm: fx.Node) -> str | None:
    """mm(a, b) or addmm(bias, a, b) -> fp8_rowwise_mm(a, b) (+ bias), in mm's dtype (K and N of
    any static size: padded). Returns None, or why the matmul was left as it was."""
    if mm.target == aten.addmm.default and not mm.kwargs:
        bias, a, b = mm.args
    elif mm.target == aten.mm.default:
        (a, b), bias = mm.args, None
    else:
        return f"{mm.name} is no plain mm/addmm"
    k, n = b.meta["val"].shape
    if not (isinstance(k, int) and isinstance(n, int)):
        return f"{mm.name} is {k} x {n} (K x N): FP8's _scaled_mm needs both known (multiples of {ALIGN})"
    with graph.inserting_before(mm):
        # _scaled_mm wants K and N in multiples of 16: zeros padded on (a weight gradient's K is the
        # token count) change no maximum and no product; padded columns of the product sliced off.
        k_pad, n_pad = -k % ALIGN, -n % ALIGN
        bt = call(graph, aten.permute.default, b, [1, 0])
        if k_pad:
            a = call(graph, aten.constant_pad_nd.default, a, [0, k_pad])
        if k_pad or n_pad:
            bt = call(graph, aten.constant_pad_nd.default, bt, [0, k_pad, 0, n_pad])
        a8, sa = _quantize_rows(graph, a)
        bt8, sb = _quantize_rows(graph, bt)
        out = call(graph, torch.ops.fvcompile.fp8_scaled_mm.default, a8,
                   call(graph, aten.permute.default, bt8, [1, 0]), sa, sb, out_dtype=mm.meta["val"].dtype)
        if n_pad:
            out = call(graph, aten.slice.Tensor, out, 1, 0, n)
        if bias is not None:
            out = call(graph, aten.add.Tensor, out, bias)
    out.meta = {**mm.meta, "val": out.meta["val"]}
    replace_node(graph, mm, out)
    return None


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KIND_MATMUL = "matmul"  # Site.kind of this pass's sites


def _float_matmul(match: Match) -> bool:
    val = match.output_node().meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype in FLOAT_DTYPES


class DenseFP8(GraphPass):
    """Every plain mm/addmm of the graph in FP8 e4m3 with row-wise scales (`to_fp8`): in training
    the forward matmuls and their backward ones (dX, dW), in inference the forward ones. Matmuls
    with a dynamic K or N are left as they are (`_scaled_mm` needs them padded to 16s, known)."""

    name = "fp8_dense"
    hook = "joint"
    exact = False
    helpers = (graph_utils,)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph, result = gm.graph, PassResult()

        def rewrite(match: Match, *_args) -> None:
            mm = match.output_node()
            name, module = mm.name, module_path(mm)
            if not ctx.module_allowed(module):
                result.skipped.append(Site(name, module, "excluded by module filter", kind=KIND_MATMUL,
                                           reason="excluded"))
                return
            before = op_counts(graph)
            why = to_fp8(graph, mm)
            if why:
                result.skipped.append(Site(name, module, why, kind=KIND_MATMUL, reason="dynamic_shape"))
            else:
                result.rewritten.append(Site(name, module, "in FP8 e4m3 (row-wise scales, _scaled_mm)",
                                             kind=KIND_MATMUL, ops=op_delta(before, op_counts(graph))))

        # A local rewrite of one node: Inductor's pattern matcher finds the nodes, `to_fp8` (shared
        # with Sparse24, which picks its nodes itself) writes the replacement, whose shape (padding)
        # depends on the matmul's sizes.
        patterns = PatternMatcherPass(pass_name="fvcompile_fp8_dense")
        for pattern in (CallFunction(aten.mm.default, Arg(), Arg()),
                        CallFunction(aten.addmm.default, Arg(), Arg(), Arg())):
            register_graph_pattern(pattern, extra_check=_float_matmul, pass_dict=patterns)(rewrite)
        patterns.apply(gm)
        return result
