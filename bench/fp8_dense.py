"""A dense FP8 Squared-ReLU FFN: the baseline that `Sparse24(fp8=True)` must be held against.

FP8 alone makes matmuls faster; to see what 2:4 sparsity adds on top, the FP8 sparse FFN is
compared with an FFN whose six matmuls all run in FP8 e4m3 through `torch._scaled_mm`, with
row-wise scales (each operand scaled along its reduction dim, the usual "rowwise" training recipe)
and gradients straight through the quantization. Written as an autograd.Function, so that
torch.compile fuses the casts around the FP8 matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvcompile.kernels.sparse24_fp8 import fp8_rowwise_mm as fp8_mm  # the formula Sparse24(fp8=True) uses


class Fp8Linear(torch.autograd.Function):
    """y = x wᵀ with the forward and both backward matmuls in FP8."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return fp8_mm(x, w.t(), x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        return fp8_mm(grad, w, grad.dtype), fp8_mm(grad.t(), x, grad.dtype)


class Fp8SquaredReLU(nn.Module):
    """W2 relu(W1 x)², both linears in FP8 (no bias, as the bench's bf16 FFN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = Fp8Linear.apply(x2, self.w1.weight)
        return Fp8Linear.apply(F.relu(h).square(), self.w2.weight).reshape(*x.shape[:-1], -1)
