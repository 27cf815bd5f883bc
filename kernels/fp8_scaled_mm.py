"""`fvcompile::fp8_scaled_mm`: `torch._scaled_mm` of e4m3 operands with row-wise scales given 1-D.

The product of the dense FP8 matmuls (`fp8_rowwise_mm` in kernels/sparse24_fp8.py, the ops that
passes/fp8_matmuls.py writes into graphs). No Triton kernel of ours: `_scaled_mm` is the kernel;
`scaled_mm_emulated` is the same formula in fp32 arithmetic (the reference, and the path of GPUs
without FP8 tensor cores).
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("fvcompile::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a8: Tensor, b8: Tensor, scale_a: Tensor, scale_b: Tensor, *, out_dtype: torch.dtype) -> Tensor:
    """`torch._scaled_mm(a8, b8)` with row-wise scales given 1-D ((M,) and (N,) fp32), rounded to
    bf16 (what CUDA's rowwise scaling writes), then to out_dtype. An op of its own so that a compiled
    graph hands the scales over as they are: Inductor gives the size-1 dim of a (M, 1) tensor the
    stride 0, which `_scaled_mm` rejects (torch 2.13). CUDA's wants a8 row-major and b8 column-major:
    the graph lays them out so; copied here only where a compiler chose other strides. GPUs before
    sm89 (no FP8 tensor cores) run the same formula in fp32."""
    if a8.is_cuda and torch.cuda.get_device_capability(a8.device) < (8, 9):  # no FP8 tensor cores
        return scaled_mm_emulated(a8, b8, scale_a, scale_b).to(out_dtype)
    a8 = a8 if a8.stride(1) == 1 else a8.contiguous()
    b8 = b8 if b8.stride(0) == 1 else b8.t().contiguous().t()
    out = torch._scaled_mm(a8, b8, scale_a=scale_a[:, None], scale_b=scale_b[None, :], out_dtype=torch.bfloat16)
    return out.to(out_dtype)


def scaled_mm_emulated(a8: Tensor, b8: Tensor, scale_a: Tensor, scale_b: Tensor) -> Tensor:
    """`_scaled_mm` with row-wise scales in fp32 arithmetic, rounded to bf16: for GPUs without FP8."""
    return ((a8.float() @ b8.float()) * scale_a[:, None] * scale_b[None, :]).to(torch.bfloat16)


@fp8_scaled_mm.register_fake
def _(a8, b8, scale_a, scale_b, *, out_dtype):
    return a8.new_empty((a8.shape[0], b8.shape[1]), dtype=out_dtype)
