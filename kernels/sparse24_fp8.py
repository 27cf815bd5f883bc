"""FP8 (e4m3) 2:4 sparse matmuls: `sparse24_mm(..., fp8=True)`, the paper's path.

arXiv 2503.16672 runs its sparse FFN matmuls in FP8. Here the sparse operand S(a) (a 2:4
selected, optionally of relu(a), optionally squared) is scaled per row, so that each row's
largest kept value maps to e4m3's largest (448), and the dense operand b per tensor:

    sa = rowmax|S(a)| / 448,   sb = max|b| / 448
    out = dtype( fp32(e4m3(S(a) / sa) @ e4m3(b / sb)) * (sa * sb)[:, None] )

The product accumulates in fp32 (on Hopper's FP8 tensor cores with fewer bits), is scaled in fp32
and is rounded once, to a's dtype.
`fp8_mm_reference` is that formula in plain PyTorch: the test oracle and the emulation on devices
without FP8 2:4 sparse tensor cores. On Hopper, `fp8_mm_cusparselt` packs S(a) straight into
cuSPARSELt's FP8 layout (kernels/sparse24_cslt.py) and multiplies with `torch._cslt_sparse_mm`,
which applies sa · sb itself, in its epilogue (cuSPARSELt's "alpha vector scaling": one factor
per row of the sparse operand): the product is written once, already scaled. Where the one-time
probe finds that epilogue wrong or missing (`sparse24_backends.fp8_scales_in_matmul`), the product
comes out in bf16 and one more pass (`rescale_triton`) scales it (some cuSPARSELt builds answer
"operation not supported" for FP8's alpha vector): one more rounding, 2⁻⁹
relative, small next to e4m3's 2⁻⁴. bf16 there, not a's dtype: the unscaled product reaches
448² · K, far past fp16's largest value (65504) for an fp16 model.

Gradients (the op's autograd) pass straight through the quantization, as FP8 training recipes do.

The FFN's other matmuls, dense, run FP8 too under `Sparse24(fp8=True)`: `fp8_rowwise_mm`, each
operand scaled along K (per row of a, per column of b), the product by `fvcompile::fp8_scaled_mm`
(`torch._scaled_mm`); the pass writes its quantization into the graph (passes/fp8_matmuls.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels import sparse24_cslt as cslt
from fvcompile.kernels.sparse24 import pad_cols, mask24, triton, unit_stride_dim
from fvcompile.kernels.fp8_scaled_mm import fp8_scaled_mm
from fvcompile.kernels.sparse24_backends import cslt_mm

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PRODUCT = torch.bfloat16  # the unscaled FP8 product, where the matmul cannot scale it (module docstring)
MIN_AMAX = 1e-12  # an all-zero row or tensor gets a scale that cannot divide by zero


def row_scale(a: Tensor, square: bool, relu: bool, a_max: Tensor | None = None) -> Tensor:
    """sa: (M,) fp32. The largest |value| of a row is always kept by the 2:4 selection, so it is
    the row's max |a| (of relu(a) with relu), or `a_max` where the caller has it already."""
    if a_max is not None:
        amax = a_max.float()
    else:  # max |a| as one reduction: abs() first would write a temporary the size of a
        amax = (a.amax(1).clamp_min(0) if relu else torch.linalg.vector_norm(a, float("inf"), dim=1)).float()
    return (amax * amax if square else amax).clamp_min(MIN_AMAX) / FP8_MAX


def tensor_scale(b: Tensor) -> Tensor:
    return torch.linalg.vector_norm(b, float("inf")).float().clamp_min(MIN_AMAX) / FP8_MAX


def quantize(x: Tensor, scale: Tensor) -> Tensor:
    """e4m3(x / scale), saturated (e4m3fn has no infinity)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) -> its e4m3 values and (M, 1) fp32 scales, each row's max |value| mapped to 448."""
    scale = x.abs().amax(1, keepdim=True).float().clamp_min(MIN_AMAX) / FP8_MAX
    return quantize(x, scale), scale


def fp8_rowwise_mm(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a (M, K) @ b (K, N), dense, in FP8 e4m3: each operand scaled along K (a per row, b per
    column: the usual "rowwise" training recipe), accumulated by `torch._scaled_mm` and rounded to
    bf16 (the one type CUDA's rowwise scaling writes), then to out_dtype. The formula of the FFN's
    dense matmuls under `Sparse24(fp8=True)`: passes/fp8_matmuls.py writes the same ops into the
    graph. K and N are padded with zeros to multiples of 16, as `_scaled_mm` needs: no maximum and
    no product changes."""
    k_pad, n_pad = -a.shape[1] % 16, -b.shape[1] % 16
    a8, sa = quantize_rows(torch.nn.functional.pad(a, (0, k_pad)))
    bt8, sb = quantize_rows(torch.nn.functional.pad(b.t(), (0, k_pad, 0, n_pad)))  # b's columns, as rows
    # Row-major a8 and column-major b8: what CUDA's _scaled_mm takes.
    out = fp8_scaled_mm(a8.contiguous(), bt8.contiguous().t(), sa.reshape(-1), sb.reshape(-1), out_dtype=out_dtype)
    return out[:, :b.shape[1]]


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _quantize_t_kernel(b_ptr, out_ptr, scale_ptr, K, N, K_OUT, N_OUT, stride_bk, stride_bn,
                           STRIDED_K: tl.constexpr, UNIT_STRIDE_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        # out[n, i] = e4m3(b[k, n] / scale), k = i or, STRIDED_K, the i-th row of the strided order
        # (sparse24_cslt.strided_order: position i holds row (i % 4) · K_OUT/4 + i // 4); rows past K
        # and columns past N (the padding) are zeros. One (BLOCK_K, BLOCK_N) tile, transposed in registers.
        i = (tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        ns = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        if STRIDED_K:
            ks = (i % 4) * (K_OUT // 4) + i // 4
        else:
            ks = i
        mask = (ks[:, None] < K) & (ns[None, :] < N)
        stride_k = 1 if UNIT_STRIDE_DIM == 0 else stride_bk  # a unit stride the compiler knows:
        stride_n = 1 if UNIT_STRIDE_DIM == 1 else stride_bn  # vector loads (unit_stride_dim)
        b = tl.load(b_ptr + ks[:, None] * stride_k + ns[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr)
        # IEEE division (a plain / is approximate on GPUs): the bytes equal `quantize`'s.
        q = tl.math.div_rn(b, tl.broadcast_to(scale, (BLOCK_K, BLOCK_N)))
        q = tl.minimum(tl.maximum(q, -448.0), 448.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + ns[None, :] * K_OUT + i[:, None], q, mask=(i[:, None] < K_OUT) & (ns[None, :] < N_OUT))

    @triton.jit
    def _rescale_kernel(p_ptr, out_ptr, sa_ptr, sb_ptr, M, N, stride_pm,
                        TRANSPOSE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # out = dtype(fp32(p) * (sa * sb)[:, None]), (M, N), or its transpose (N, M): `rescale`,
        # one multiply each, equal bytes. The transpose costs nothing more: the pass copies anyway.
        ms = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        ns = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (ms[:, None] < M) & (ns[None, :] < N)
        p = tl.load(p_ptr + ms[:, None] * stride_pm + ns[None, :], mask=mask, other=0.0).to(tl.float32)
        out = p * (tl.load(sa_ptr + ms, mask=ms < M, other=0.0) * tl.load(sb_ptr))[:, None]
        if TRANSPOSE_OUT:
            tl.store(out_ptr + ns[None, :] * M + ms[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + ms[:, None] * N + ns[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def rescale_triton(product: Tensor, sa: Tensor, sb: Tensor, transpose_out: bool, dtype=None,
                   block_m: int = 32, block_n: int = 128) -> Tensor:
    """`rescale` in one pass, into a new contiguous tensor: product (M, N) may be a padded matmul
    output sliced to size (rows of unit stride, read as vectors; other strides are copied first).
    Eager PyTorch makes four passes (float, two multiplies, cast) over fp32 temporaries."""
    m, n = product.shape
    product = product if product.stride(1) == 1 else product.contiguous()
    out = torch.empty((n, m) if transpose_out else (m, n), dtype=dtype or product.dtype, device=product.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _rescale_kernel[grid](product, out, sa.float().contiguous(), sb.float().reshape(1), m, n,
                          product.stride(0), TRANSPOSE_OUT=transpose_out,
                          BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def quantize_column_major_reference(b: Tensor, scale: Tensor, strided_k: bool = False, n_multiple: int = 1) -> Tensor:
    """`quantize(b, scale)` laid out column-major: what `quantize_column_major_triton` writes. With
    strided_k, b's rows (K) first padded and put in the strided order (`sparse24_cslt.to_strided_k`);
    its columns padded with zeros to a multiple of n_multiple."""
    b = cslt.to_strided_k(b, 0) if strided_k else b
    return quantize(pad_cols(b, n_multiple).t(), scale).contiguous().t()


def quantize_column_major_triton(b: Tensor, scale: Tensor, strided_k: bool = False, n_multiple: int = 1,
                                 block_k: int = 64, block_n: int = 64) -> Tensor:
    """e4m3(b / scale) for b (K, N) of any strides, laid out column-major (the FP8 B operand
    cuSPARSELt wants): one pass over b, where eager PyTorch makes five (float, divide, clamp,
    cast, transposing copy). The strided
    order of a weight gradient's tokens and the padding are read into place in the same pass
    (`quantize_column_major_reference`), not copied first."""
    k, n = b.shape
    k_out = cslt.strided_k_padded(k) if strided_k else k
    n_out = -(-n // n_multiple) * n_multiple
    out = torch.empty((n_out, k_out), dtype=FP8, device=b.device)
    grid = (triton.cdiv(k_out, block_k), triton.cdiv(n_out, block_n))
    _quantize_t_kernel[grid](b, out, scale.float().reshape(1), k, n, k_out, n_out, b.stride(0), b.stride(1),
                             STRIDED_K=strided_k, UNIT_STRIDE_DIM=unit_stride_dim(b), BLOCK_K=block_k,
                             BLOCK_N=block_n)
    return out.t()


def fp8_exact_operands(m: int, k: int, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """bf16 a (m, k), b (k, n) that FP8 holds exactly under the scales of the formula: e4m3 values,
    each row of a (times a power of 2) and all of b reaching ±448. Their FP8 product equals the
    exact product rounded once, on any device: what the probe and the tests compare with."""
    gen = torch.Generator().manual_seed(seed)

    def e4m3(*shape):
        return (torch.randn(*shape, generator=gen) * 32).to(FP8).float()

    a = e4m3(m, k)
    a[:, 0] = 448.0  # the row maximum (kept: the largest of its group)
    a = a * 2.0 ** torch.randint(-4, 4, (m, 1), generator=gen).float()
    b = e4m3(k, n)
    b[0, 0] = -448.0
    return a.to(torch.bfloat16), (b * 0.25).to(torch.bfloat16)


def rescale(product: Tensor, sa: Tensor, sb: Tensor, transpose_out: bool, dtype) -> Tensor:
    """product (M, N) scaled by sa·sb per row, rounded to dtype; transpose_out: its transpose."""
    out = (product.float() * (sa * sb)[:, None]).to(dtype)  # one multiply per element, as the kernel does
    return out.t() if transpose_out else out


def fp8_mm_reference(a: Tensor, b: Tensor, *, select: bool = True, square: bool = False, relu: bool = False,
                     transpose_out: bool = False, a_max: Tensor | None = None) -> Tensor:
    """The formula of the module docstring in plain PyTorch (any device, any float dtype)."""
    if relu:
        a = torch.relu(a)
    if select or relu:
        a = torch.where(mask24(a.abs()), a, 0)
    values = a.float() ** 2 if square else a.float()
    # values are S(a)[²] already; a_max, given, is of S(a): the same scale, squared
    sa = row_scale(values, False, False) if a_max is None else row_scale(a, square, False, a_max)
    sb = tensor_scale(b)
    product = quantize(values, sa[:, None]).float() @ quantize(b, sb).float()
    return rescale(product, sa, sb, transpose_out, a.dtype)


def fp8_mm_cusparselt(a: Tensor, b: Tensor, *, select: bool = True, square: bool = False, relu: bool = False,
                      transpose_out: bool = False, strided_k: bool = False, a_max: Tensor | None = None,
                      scales_in_matmul: bool = True) -> Tensor:
    """The same on Hopper: our pack into cuSPARSELt's FP8 layout + `torch._cslt_sparse_mm`, which
    scales the product in its epilogue; scales_in_matmul=False or transpose_out: a bf16 product +
    `rescale_triton`.
    strided_k: K in the strided order (`sparse24_cslt.strided_order`), padded to a multiple of 64;
    both operands are read into that order by the passes that quantize them."""
    sa, sb = row_scale(a, square, relu, a_max), tensor_scale(b)
    compressed = cslt.cslt_pack_triton(a, square=square, relu=relu, out_dtype=FP8, scale=sa, strided_k=strided_k)
    b8 = quantize_column_major_triton(b, sb, strided_k=strided_k, n_multiple=16)  # FP8 wants N in 16s
    m, n = a.shape[0], b.shape[1]
    if scales_in_matmul and not transpose_out:  # one factor per row of the (row-padded) sparse operand
        alpha = torch.nn.functional.pad(sa * sb, (0, compressed.shape[0] - m))
        return cslt_mm(compressed, b8, m, False, out_dtype=a.dtype, alpha=alpha, n=n)
    # Never a transposed result from cuSPARSELt: its algorithm search skips those (`cslt_plan`), and
    # in FP8 its default algorithm is much slower than the searched one. The rescale pass
    # writes the transpose instead, at no extra cost.
    product = cslt_mm(compressed, b8, m, False, out_dtype=PRODUCT)[:, :n]  # b8's padded columns: a view
    return rescale_triton(product, sa, sb, transpose_out, a.dtype)
