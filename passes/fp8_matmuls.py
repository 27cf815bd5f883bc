"""Dense matmuls of a graph in FP8 e4m3: `mm`/`addmm` nodes rewritten into the ops of
`kernels/sparse24_fp8.fp8_rowwise_mm` (row-wise scales, `torch._scaled_mm`).

Plain aten ops for the scales and the quantization, so that Inductor fuses them into the kernels
around them; the product is `fvcompile::fp8_scaled_mm` (`_scaled_mm`, its scales passed 1-D).
Used by `Sparse24(fp8=True)` for the FFN matmuls that are not 2:4 sparse: a helper of that pass
(importing the kernel module registers the op), not a pass of its own.
"""
from __future__ import annotations

import torch
from torch import fx

from fvcompile.kernels.sparse24_fp8 import FP8, FP8_MAX, MIN_AMAX
from fvcompile.passes.base import call

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
                   call(graph, aten.permute.default, bt8, [1, 0]), sa, sb, mm.meta["val"].dtype)
        if n_pad:
            out = call(graph, aten.slice.Tensor, out, 1, 0, n)
        if bias is not None:
            out = call(graph, aten.add.Tensor, out, bias)
    out.meta = {**mm.meta, "val": out.meta["val"]}
    mm.replace_all_uses_with(out)
    graph.erase_node(mm)
    return None
