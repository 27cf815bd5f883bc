"""`fvcompile::relu2_sparse24_pack`: relu(h)² with 2 of every 4 kept, packed in CUTLASS's layout.

Relu, square, 2:4 selection and packing in one pass: the pack kernel of
kernels/sparse24_cutlass.py run with its relu-square prologue (`relu2_sparse24_pack_triton`). The
reference is `sparse24_relu_reference`, squared, through PyTorch's own CUTLASS conversion
(`pack_reference`); the fake gives `sparse24_pack`'s shapes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import sparse24_relu_reference, use_triton
from fvcompile.kernels.sparse24_cutlass import (as_rows, check_packable, pack_fake, pack_reference,
                                                relu2_sparse24_pack_triton)


@torch.library.custom_op("fvcompile::relu2_sparse24_pack", mutates_args=())
def relu2_sparse24_pack(h: Tensor) -> tuple[Tensor, Tensor]:
    """relu(h)² with 2 of 4 kept, packed: values (M_pad, K/2) and CUTLASS metadata (M_pad, K/16)."""
    check_packable(h)
    if use_triton(h):
        return relu2_sparse24_pack_triton(h)
    r = sparse24_relu_reference(as_rows(h))
    return pack_reference(r * r)


relu2_sparse24_pack.register_fake(pack_fake)
