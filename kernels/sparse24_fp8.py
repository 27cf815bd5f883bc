"""FP8 (e4m3) 2:4 sparse matmuls: `sparse24_mm(..., fp8=True)`, the paper's path.

arXiv 2503.16672 runs its sparse FFN matmuls in FP8. Here the sparse operand S(a) (a 2:4
selected, optionally of relu(a), optionally squared) is scaled per row, so that each row's
largest kept value maps to e4m3's largest (448), and the dense operand b per tensor:

    sa = rowmax|S(a)| / 448,   sb = max|b| / 448
    out = dtype( dtype(e4m3(S(a) / sa) @ e4m3(b / sb)) * sa[:, None] * sb )

The product accumulates in fp32 and is rounded to a's dtype before the scales are applied, as the
GPU path does (cuSPARSELt writes a bf16/fp16 product; we rescale it). `fp8_mm_reference` is that
formula in plain PyTorch: the test oracle and the emulation on devices without FP8 2:4 sparse
tensor cores. On Hopper, `fp8_mm_cusparselt` packs S(a) straight into cuSPARSELt's FP8 layout
(kernels/sparse24_cslt.py) and multiplies with `torch._cslt_sparse_mm`.

Gradients (the op's autograd) pass straight through the quantization, as FP8 training recipes do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import mask24

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = 1e-12  # an all-zero row or tensor gets a scale that cannot divide by zero


def row_scale(a: Tensor, square: bool, relu: bool) -> Tensor:
    """sa: (M,) fp32. The largest |value| of a row is always kept by the 2:4 selection."""
    amax = (a.amax(1).clamp_min(0) if relu else a.abs().amax(1)).float()
    return (amax * amax if square else amax).clamp_min(_TINY) / FP8_MAX


def tensor_scale(b: Tensor) -> Tensor:
    return b.abs().amax().float().clamp_min(_TINY) / FP8_MAX


def quantize(x: Tensor, scale: Tensor) -> Tensor:
    """e4m3(x / scale), saturated (e4m3fn has no infinity)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _rescale(product: Tensor, sa: Tensor, sb: Tensor, transpose_out: bool, dtype) -> Tensor:
    row = sa[None, :] if transpose_out else sa[:, None]  # a's rows are the output's columns when transposed
    return (product.float() * row * sb).to(dtype)


def fp8_mm_reference(a: Tensor, b: Tensor, select: bool, square: bool, relu: bool,
                     transpose_out: bool) -> Tensor:
    """The formula of the module docstring in plain PyTorch (any device, any float dtype)."""
    if relu:
        a = torch.relu(a)
    if select or relu:
        a = torch.where(mask24(a.abs()), a, 0)
    values = a.float() ** 2 if square else a.float()
    sa = values.abs().amax(1).clamp_min(_TINY) / FP8_MAX
    sb = tensor_scale(b)
    product = (quantize(values, sa[:, None]).float() @ quantize(b, sb).float()).to(a.dtype)
    return _rescale(product.t() if transpose_out else product, sa, sb, transpose_out, a.dtype)


def fp8_mm_cusparselt(a: Tensor, b: Tensor, select: bool, square: bool, relu: bool,
                      transpose_out: bool) -> Tensor:
    """The same on Hopper: our pack into cuSPARSELt's FP8 layout + `torch._cslt_sparse_mm`."""
    from fvcompile.kernels.sparse24 import _cslt_mm
    from fvcompile.kernels.sparse24_cslt import cslt_pack_triton

    sa, sb = row_scale(a, square, relu), tensor_scale(b)
    compressed = cslt_pack_triton(a, square=square, relu=relu, out_dtype=FP8, scale=sa)
    n = b.shape[1]
    b = torch.nn.functional.pad(b, (0, (-n) % 16))
    b8 = quantize(b.t(), sb).contiguous().t()  # FP8 wants B column-major
    product = _cslt_mm(compressed, b8, a.shape[0], transpose_out, out_dtype=a.dtype)
    product = product[:n] if transpose_out else product[:, :n]
    return _rescale(product, sa, sb, transpose_out, a.dtype)
