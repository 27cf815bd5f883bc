"""The dense FP8 linear the FP8 passes are checked against (shared by their tests)."""
import torch

from fvcompile.kernels.sparse24_fp8 import fp8_rowwise_mm


class Fp8DenseLinear(torch.autograd.Function):
    """y = x wᵀ with the forward and both backward matmuls in FP8, row-wise scales, straight
    through the quantization."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return fp8_rowwise_mm(x, w.t(), x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return fp8_rowwise_mm(grad, w, x.dtype), fp8_rowwise_mm(grad.t(), x, x.dtype)
