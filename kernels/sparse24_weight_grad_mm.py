"""`fvcompile::sparse24_weight_grad_mm`: a weight gradient as a 2:4 sparse matmul along the tokens.

A weight gradient dW = gᵀ · s reduces over the tokens: `sparse24_weight_grad_mm(sᵀ, g)` keeps the
2 largest magnitudes of every 4 tokens of each row of sᵀ (a hidden unit) and multiplies as
`sparse24_mm` does (kernels/sparse24_mm.py: the same backends, emulation and FP8 formula). The
tokens are grouped strided by default, t with t + T/4, t + T/2 and t + 3T/4, T padded with zero
tokens to a multiple of 64: neighbouring tokens are alike, and dropping 2 of 4 alike tokens loses
more. The product can come out transposed, in the weight's own layout; the densest rows (features)
can be multiplied whole.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import squared
from fvcompile.kernels.sparse24_mm import (kept_entries, matmul_backward, save_for_matmul_backward, sparse24_matmul,
                                           warmup_matmul)
from fvcompile.kernels.sparse24_schedule import in_dense_warmup


@torch.library.custom_op("fvcompile::sparse24_weight_grad_mm", mutates_args=())
def sparse24_weight_grad_mm(a: Tensor, b: Tensor, a_max: Tensor | None = None, row_counts: Tensor | None = None, *,
                            schedule: str = "", square: bool = False, transpose_out: bool = False, fp8: bool = False,
                            strided_k: bool = True, dense_rows: float = 0.0) -> Tensor:
    """mask24(a) @ b for a (M, K) with K the tokens (sᵀ of a weight gradient) and b (K, N): (M, N),
    or with transpose_out its transpose (N, M), contiguous.

    a_max: (M,) fp32, the largest |value| of every row of `a` (before squaring), where the caller
        has it: the FP8 scales, not read from `a` again.
    row_counts: (M,), the nonzeros of every row of `a`, where the caller has them (a reduction a
        compiler fuses into a's own kernel): `dense_rows` picks its rows from them.
    schedule: a `WarmupSchedule.key` ("": none): a dense product while that site warms up.
    square: mask24(a)² @ b (the caller passes r where s = r²).
    transpose_out: the product transposed, (N, M), written in that layout (the weight's).
    fp8: in float8_e4m3fn, `a` scaled per row and b per tensor (kernels/sparse24_fp8.py).
    strided_k: the tokens grouped strided (True) or as neighbours.
    dense_rows: the ceil(dense_rows · M) rows of `a` with the most nonzeros multiplied whole.
    """
    if in_dense_warmup(schedule):
        return warmup_matmul(a, b, square=square, relu=False, transpose_out=transpose_out, fp8=fp8)
    out = sparse24_matmul(a, b, a_max, select=True, square=square, relu=False, transpose_out=transpose_out, fp8=fp8,
                          strided_k=strided_k)
    if dense_rows:
        rows = densest_rows(a, dense_rows, row_counts)
        fix = (squared(a[rows]) if square else a[rows]) @ b  # a small dense matmul: dense_rows · M rows
        if transpose_out:
            out[:, rows] = fix.t()
        else:
            out[rows] = fix
    return out.contiguous()


@sparse24_weight_grad_mm.register_fake
def _(a, b, a_max=None, row_counts=None, *, schedule="", square=False, transpose_out=False, fp8=False,
      strided_k=True, dense_rows=0.0):
    return a.new_empty((b.shape[1], a.shape[0]) if transpose_out else (a.shape[0], b.shape[1]))


def densest_rows(a: Tensor, fraction: float, counts: Tensor | None = None) -> Tensor:
    """The indices of the ceil(fraction·M) rows of `a` with the most nonzeros (`counts`: those
    numbers, where the caller has them)."""
    counts = torch.count_nonzero(a, dim=1) if counts is None else counts
    return counts.topk(math.ceil(fraction * a.shape[0])).indices


def _setup(ctx, inputs, keyword_only_inputs, output):
    a, b, _a_max, counts = inputs
    opts = keyword_only_inputs
    dense = in_dense_warmup(opts["schedule"])  # the forward's decision
    keep = kept_entries(a, select=True, relu=False, strided_k=opts["strided_k"], dense=dense)
    if opts["dense_rows"] and not dense:
        keep[densest_rows(a, opts["dense_rows"], counts)] = True
    save_for_matmul_backward(ctx, a, b, keep, square=opts["square"], relu=False, transpose_out=opts["transpose_out"])


def _backward(ctx, grad):
    return (*matmul_backward(ctx, grad), None, None)


sparse24_weight_grad_mm.register_autograd(_backward, setup_context=_setup)
