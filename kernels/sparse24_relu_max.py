"""`fvcompile::sparse24_relu_max`: `sparse24_relu`, and its output's row and column maxima.

One pass of the selection kernel of kernels/sparse24.py (`sparse24_relu_max_triton`, reference
`sparse24_relu_max_reference`) gives r = sparse24_relu(h) and the largest value of its every row
and every column (h flattened to 2-D; fp32): the FP8 scales of the forward matmul, which reads
r's rows, and of the sparse dW2, which reads its columns, with no pass over r of their own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import row_col_max, sparse24_relu_max_reference, sparse24_relu_max_triton, use_triton
from fvcompile.kernels.sparse24_relu import relu_backward
from fvcompile.kernels.sparse24_schedule import in_dense_warmup


@torch.library.custom_op("fvcompile::sparse24_relu_max", mutates_args=())
def sparse24_relu_max(h: Tensor, *, schedule: str = "",
                      count_step: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(r, row_max, col_max): r as `sparse24_relu(h, schedule=, count_step=)` gives it, and the
    maxima of r's rows ((M,), fp32) and columns ((K,), fp32). The maxima are not differentiable."""
    if in_dense_warmup(schedule, count_step):
        r = torch.relu(h).contiguous()
        return (r, *row_col_max(r))
    if use_triton(h):
        return sparse24_relu_max_triton(h)
    return sparse24_relu_max_reference(h)


@sparse24_relu_max.register_fake
def _(h, *, schedule="", count_step=False):
    k = h.shape[-1]
    return (h.new_empty(h.shape), h.new_empty((h.numel() // k,), dtype=torch.float32),
            h.new_empty((k,), dtype=torch.float32))


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(output[0])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad, _grad_rows, _grad_cols):
    return relu_backward(ctx, grad)


sparse24_relu_max.register_autograd(_backward, setup_context=_setup)
