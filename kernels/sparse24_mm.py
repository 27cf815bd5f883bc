"""`fvcompile::sparse24_mm`: the 2:4 sparse matmul of the forward and of dX, with its emulation,
fake and autograd; and the matmul both 2:4 ops run (`sparse24_matmul`).

`sparse24_mm(a, b)` is mask24(a) @ b, the 2 largest magnitudes of every 4 of `a` (M, K) along K
kept, K being the hidden dim (the forward's A · W2ᵀ, the backward's dH · W1). On a GPU with 2:4
sparse tensor cores it selects, packs and runs the sparse matmul (kernels/sparse24_backends.py);
elsewhere a dense matmul of the masked tensor (same numbers up to accumulation order). Prologues
fused into the pack: `square` (mask24(a)² @ b: the forward passes the sparse relu r, so r² is
never written) and `relu` (h itself: relu, 2:4, square and pack in one pass). `fp8` multiplies in
float8_e4m3fn (kernels/sparse24_fp8.py). The weight gradients, whose K is the tokens, have their
own op (kernels/sparse24_weight_grad_mm.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_fp8
from fvcompile.kernels.sparse24 import ALIGN_K, PACK_DTYPES, mask24, sparse24_mask_reference, squared
from fvcompile.kernels.sparse24_cslt import from_strided_k, to_strided_k
from fvcompile.kernels.sparse24_schedule import in_dense_warmup


@torch.library.custom_op("fvcompile::sparse24_mm", mutates_args=())
def sparse24_mm(a: Tensor, b: Tensor, a_max: Tensor | None = None, *, schedule: str = "", select: bool = True,
                square: bool = False, relu: bool = False, fp8: bool = False) -> Tensor:
    """mask24(a) @ b for a (M, K) and a dense b (K, N): (M, N), contiguous.

    a_max: (M,) fp32, the largest |value| of every row of `a` before squaring (of relu(a) where
        relu=True), where the caller has it (`sparse24_relu_max`): FP8 scales with it instead of
        reading `a` once more (the same scale: a row's largest value is always kept).
    schedule: a `WarmupSchedule.key` ("": none): a dense product while that site warms up.
    select: False is the caller's promise that `a` already is 2:4 along K (the forward's sparse
        relu, the backward's dH): the emulation skips the selection.
    square: mask24(a)² @ b, so that the forward passes r for relu(h)² = r².
    relu: mask24(relu(a))[²] @ b: relu, 2:4, square and pack in one pass over h.
    fp8: in float8_e4m3fn, `a` scaled per row and b per tensor (kernels/sparse24_fp8.py).
    """
    options = dict(square=square, relu=relu, transpose_out=False, fp8=fp8)
    if in_dense_warmup(schedule):
        return warmup_matmul(a, b, **options)
    return sparse24_matmul(a, b, a_max, select=select, strided_k=False, **options).contiguous()


@sparse24_mm.register_fake
def _(a, b, a_max=None, *, schedule="", select=True, square=False, relu=False, fp8=False):
    return a.new_empty((a.shape[0], b.shape[1]))


def warmup_matmul(a: Tensor, b: Tensor, *, square: bool, relu: bool, transpose_out: bool, fp8: bool) -> Tensor:
    """The dense product a 2:4 op gives during its warm-up: relu(a)[²] @ b, with no selection.
    The warm-up is of 2:4 sparsity, not of FP8: with fp8 it is the dense FP8 formula, as the FFN's
    other matmuls are."""
    a = torch.relu(a) if relu else a
    a = squared(a) if square else a
    out = sparse24_fp8.fp8_rowwise_mm(a, b, a.dtype) if fp8 else a @ b
    return (out.t() if transpose_out else out).contiguous()


def sparse24_matmul(a: Tensor, b: Tensor, a_max: Tensor | None = None, *, select: bool, square: bool, relu: bool,
                    transpose_out: bool, fp8: bool, strided_k: bool) -> Tensor:
    """mask24(a)[²] @ b (or its transpose) on what the device runs: our cuSPARSELt pack, another
    backend, or the emulation. strided_k: K grouped in fours strided (`sparse24_cslt.strided_order`),
    zero-padded to a multiple of 64 on every device."""
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
    flags = dict(select=select, square=square, relu=relu, transpose_out=transpose_out)
    if fp8:
        if not cslt_pack:  # emulated
            return sparse24_fp8.fp8_mm_reference(a, b, a_max=a_max, **flags)
        return sparse24_fp8.fp8_mm_cusparselt(a, b, strided_k=strided_k, a_max=a_max,
                                              scales_in_matmul=backends.fp8_scales_in_matmul(a.device), **flags)
    if cslt_pack:
        return backends.cusparselt_mm(a, b, strided_k=strided_k, **flags)
    if sparse_mm_applies(a, b):
        return backends.SPARSE_MM[backends.sparse_mm_backend(a.device)](a, b, **flags)
    if relu:
        a = torch.relu(a)
    a = sparse24_mask_reference(a) if select or relu else a
    out = (squared(a) if square else a) @ b  # emulated
    return out.t() if transpose_out else out


def sparse_mm_applies(a: Tensor, b: Tensor) -> bool:
    """Whether a 2:4 matmul of a (M, K) and b runs on sparse tensor cores (else it is emulated)."""
    return (
        a.dtype in PACK_DTYPES and b.dtype == a.dtype and a.shape[1] % ALIGN_K == 0
        and backends.sparse_tensor_cores_available(a.device)
    )


def kept_entries(a: Tensor, *, select: bool, relu: bool, strided_k: bool, dense: bool) -> Tensor:
    """Where mask24 keeps `a` (of relu(a) with relu), as the forward selected: every entry during
    a warm-up (dense) or where the caller promised a 2:4 `a` (no select)."""
    a_in = torch.relu(a) if relu else a
    keep = torch.ones_like(a, dtype=torch.bool)
    if (select or relu) and not dense:
        if strided_k:  # selected in the (padded) strided order, put back in a's
            keep = from_strided_k(mask24(to_strided_k(a_in, 1).abs()), a.shape[1])
        else:
            keep = mask24(a_in.abs())
    return keep


def save_for_matmul_backward(ctx, a: Tensor, b: Tensor, keep: Tensor, *, square: bool, relu: bool,
                             transpose_out: bool) -> None:
    """What `matmul_backward` needs: the kept entries of `a` (of relu(a)), b and the flags."""
    if relu:
        keep = keep & (a > 0)  # relu's own gradient
    ctx.square, ctx.transpose_out = square, transpose_out
    ctx.save_for_backward(keep, torch.where(keep, torch.relu(a) if relu else a, 0), b)


def matmul_backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(grad a, grad b) of keep ⊙ a [squared] @ b: straight through the selection, which is
    piecewise constant (and the FP8 quantization, where there is one)."""
    keep, a_kept, b = ctx.saved_tensors
    if ctx.transpose_out:
        grad = grad.t()
    grad_a = (grad @ b.t()) * keep
    if ctx.square:  # d(a²)/da = 2a
        grad_a, a_kept = 2 * a_kept * grad_a, squared(a_kept)
    return grad_a, a_kept.t() @ grad


def _setup(ctx, inputs, keyword_only_inputs, output):
    a, b, _a_max = inputs
    opts = keyword_only_inputs
    dense = in_dense_warmup(opts["schedule"])  # the forward's decision
    keep = kept_entries(a, select=opts["select"], relu=opts["relu"], strided_k=False, dense=dense)
    save_for_matmul_backward(ctx, a, b, keep, square=opts["square"], relu=opts["relu"], transpose_out=False)


def _backward(ctx, grad):
    return (*matmul_backward(ctx, grad), None)


sparse24_mm.register_autograd(_backward, setup_context=_setup)
