"""`fvcompile::sparse24_relu`: relu(h) with only the 2 largest of every 4 along the last dim kept.

The Triton kernel is the selection of kernels/sparse24.py (`sparse24_relu_triton`); the reference
`sparse24_relu_reference`. Differentiable: grad * (out > 0). Squaring is monotone on relu's
output, so this is also the 2:4 mask of relu(h)² (passes/sparse24_steps.py says why the pass
replaces the relu node with it). During a dense warm-up (kernels/sparse24_schedule.py) it is relu.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import sparse24_relu_reference, sparse24_relu_triton, use_triton
from fvcompile.kernels.sparse24_schedule import in_dense_warmup


@torch.library.custom_op("fvcompile::sparse24_relu", mutates_args=())
def sparse24_relu(h: Tensor, *, schedule: str = "", count_step: bool = False) -> Tensor:
    """relu(h), keeping the 2 largest of every 4 along the last dim.

    schedule: a `WarmupSchedule.key` ("": none): relu(h) itself while that site warms up dense.
    count_step: this call opens the next training step of the schedule (a site's counting op).
    """
    if in_dense_warmup(schedule, count_step):
        return torch.relu(h).contiguous()
    if use_triton(h):
        return sparse24_relu_triton(h)
    return sparse24_relu_reference(h)


@sparse24_relu.register_fake
def _(h, *, schedule="", count_step=False):
    return h.new_empty(h.shape)


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(output)


def relu_backward(ctx, grad):
    """The gradient of a (sparse) relu from its output: grad where the output is positive."""
    (out,) = ctx.saved_tensors
    return grad * (out > 0)


sparse24_relu.register_autograd(relu_backward, setup_context=_setup)
