"""`sparse24_mm`: the 2:4 sparse matmul op, with its emulation, fake and autograd.

`sparse24_mm(a, b)` is mask24(a) @ b, the 2 largest magnitudes of every 4 of `a` (M, K) along K
kept. On a GPU with 2:4 sparse tensor cores it selects, packs and runs the sparse matmul
(kernels/sparse24_backends.py); elsewhere it runs the emulated path: a dense matmul of the masked
tensor (same numbers up to accumulation order). For an `a` that already is 2:4 the selection
changes nothing. Prologues fused into the pack: `square` (mask24(a)² @ b: the forward passes the
sparse relu r, so r² is never written) and `relu` (h itself: relu, 2:4, square and pack in one
pass). `fp8=True` multiplies in float8_e4m3fn (kernels/sparse24_fp8.py), with `a`'s row maxima
from `a_max` where the caller has them. Its options are documented on the op below.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_fp8
from fvcompile.kernels.sparse24 import (ALIGN_K, PACK_DTYPES, _in_dense_warmup, _squared, mask24,
                                        sparse24_mask_reference)
from fvcompile.kernels.sparse24_cslt import from_strided_k, to_strided_k


def sparse_mm_applies(a: Tensor, b: Tensor) -> bool:
    """Whether sparse24_mm(a, b) runs on sparse tensor cores (else it is emulated)."""
    return (
        a.dtype in PACK_DTYPES and b.dtype == a.dtype and a.shape[1] % ALIGN_K == 0
        and backends.sparse_tensor_cores_available(a.device)
    )


@torch.library.custom_op("fvcompile::sparse24_mm", mutates_args=())
def sparse24_mm(a: Tensor, b: Tensor, schedule: str = "", dense_steps: int = 0, select: bool = True,
                square: bool = False, relu: bool = False, transpose_out: bool = False, fp8: bool = False,
                strided_k: bool = False, dense_rows: float = 0.0, a_max: Tensor | None = None,
                row_counts: Tensor | None = None) -> Tensor:
    """mask24(a) @ b for a (M, K) and a dense b (K, N); with square=True, mask24(a)² @ b.

    select=False is the caller's promise that `a` already is 2:4 along K (the forward's sparse relu,
    the backward's dH); the emulation then skips the selection (mask24(a) == a). square=True lets
    the forward pass the sparse relu r itself for relu(h)² = r², so that r² is never written out;
    relu=True takes h itself (mask24(relu(h))[²] @ b: relu, 2:4, square and pack in one pass).
    transpose_out=True returns the product transposed, (N, M) and contiguous: a weight gradient
    computed as (Aᵀ-side sparse) @ dY comes out in the weight's own layout, with no transposing copy.
    fp8=True multiplies in float8_e4m3fn, `a` scaled per row and b per tensor (kernels/sparse24_fp8.py).
    strided_k=True groups K in fours strided, not consecutively (`sparse24_cslt.strided_order`): for
    a weight gradient, whose K is the tokens, neighbouring tokens then do not compete. K is padded
    with zeros to a multiple of 64 first, on every device, so any token count runs sparse.
    dense_rows=f: the ceil(f·M) rows of `a` with the most nonzeros are multiplied whole, not 2:4
    (for a weight gradient, whose rows are features: the densest features stay dense).
    a_max: the largest |value| of every row of the operand before squaring (of relu(a) where
    relu=True; fp32, (M,)), where the caller has it from an earlier pass (`sparse24_relu_max`):
    FP8 then scales with it instead of reading `a` once more (the same scale: a row's largest
    value is always kept by the 2:4 selection).
    row_counts: the number of nonzeros in every row of `a` (of relu(a) where relu=True), where the
    caller has it (a reduction a compiler fuses into a's own kernel): `dense_rows` then picks its
    rows from it instead of counting them here.
    """
    out = _sparse24_mm(a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k, a_max)
    if dense_rows and not _in_dense_warmup(schedule, dense_steps, count_step=False):
        rows = densest_rows(torch.relu(a) if relu else a, dense_rows, row_counts)
        kept = torch.relu(a[rows]) if relu else a[rows]
        fix = (_squared(kept) if square else kept) @ b  # a small dense matmul: f·M rows
        if transpose_out:
            out[:, rows] = fix.t()
        else:
            out[rows] = fix
    return out if out.is_contiguous() else out.contiguous()


def densest_rows(a: Tensor, fraction: float, counts: Tensor | None = None) -> Tensor:
    """The indices of the ceil(fraction·M) rows of `a` with the most nonzeros (`counts`: those
    numbers, where the caller has them)."""
    counts = torch.count_nonzero(a, dim=1) if counts is None else counts
    return counts.topk(math.ceil(fraction * a.shape[0])).indices


def _sparse24_mm(a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k,
                 a_max=None) -> Tensor:
    if _in_dense_warmup(schedule, dense_steps, count_step=False):
        a = torch.relu(a) if relu else a
        a = _squared(a) if square else a  # during the warm-up `a` is dense
        # The warm-up is of 2:4 sparsity, not of FP8: FP8 runs dense, as the FFN's other matmuls do.
        out = sparse24_fp8.fp8_rowwise_mm(a, b, a.dtype) if fp8 else a @ b
        return out.t() if transpose_out else out
    # Whether our cuSPARSELt pack runs this call (a strided K is padded: any token count fits).
    cslt_pack = (a.dtype in PACK_DTYPES and b.dtype == a.dtype and (strided_k or a.shape[1] % ALIGN_K == 0)
                 and backends.sparse_mm_backend(a.device) == "cusparselt"
                 and (not fp8 or backends.fp8_sparse_mm_available(a.device)))
    if strided_k and not (fp8 and cslt_pack):  # the FP8 path reads both operands into that order itself
        # K padded with zeros and reordered on both sides: the product is the same.
        b = to_strided_k(b, 0)  # a gather of its rows
        if not cslt_pack:  # elsewhere `a` is copied in that order; our cuSPARSELt pack reads it in place
            a = to_strided_k(a, 1)
            strided_k = False
    if fp8:
        if not cslt_pack:  # emulated
            return sparse24_fp8.fp8_mm_reference(a, b, select, square, relu, transpose_out, a_max)
        return sparse24_fp8.fp8_mm_cusparselt(a, b, select, square, relu, transpose_out, strided_k, a_max,
                                              backends.fp8_scales_in_matmul(a.device))
    if cslt_pack:
        return backends.cusparselt_mm(a, b, select, square, relu, transpose_out, strided_k)
    if sparse_mm_applies(a, b):
        return backends.SPARSE_MM[backends.sparse_mm_backend(a.device)](a, b, select, square, relu, transpose_out)
    if relu:
        a = torch.relu(a)
    a = sparse24_mask_reference(a) if select or relu else a
    out = (_squared(a) if square else a) @ b  # emulated
    return out.t() if transpose_out else out


@sparse24_mm.register_fake
def _(a, b, schedule="", dense_steps=0, select=True, square=False, relu=False, transpose_out=False, fp8=False,
      strided_k=False, dense_rows=0.0, a_max=None, row_counts=None):
    return a.new_empty((b.shape[1], a.shape[0]) if transpose_out else (a.shape[0], b.shape[1]))


def _sparse24_mm_setup(ctx, inputs, output):
    a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k, dense_rows, _a_max, counts = inputs
    dense = _in_dense_warmup(schedule, dense_steps, count_step=False)  # the forward's decision
    a_in = torch.relu(a) if relu else a
    keep = torch.ones_like(a, dtype=torch.bool)
    if (select or relu) and not dense:
        if strided_k:  # selected in the (padded) strided order, put back in a's
            keep = from_strided_k(mask24(to_strided_k(a_in, 1).abs()), a.shape[1])
        else:
            keep = mask24(a_in.abs())
        if dense_rows:
            keep[densest_rows(a_in, dense_rows, counts)] = True
    if relu:
        keep = keep & (a > 0)  # relu's own gradient
    ctx.square, ctx.transpose_out = square, transpose_out
    ctx.save_for_backward(keep, torch.where(keep, a_in, 0), b)


def _sparse24_mm_backward(ctx, grad):
    keep, a_kept, b = ctx.saved_tensors
    if ctx.transpose_out:
        grad = grad.t()
    grad_a = (grad @ b.t()) * keep
    if ctx.square:  # d(a²)/da = 2a
        grad_a, a_kept = 2 * a_kept * grad_a, _squared(a_kept)
    return grad_a, a_kept.t() @ grad, None, None, None, None, None, None, None, None, None, None, None


sparse24_mm.register_autograd(_sparse24_mm_backward, setup_context=_sparse24_mm_setup)
