"""`fvcompile::fp8_scaled_mm` (kernels/fp8_scaled_mm.py) against its fp32 emulation (the
reference) and `torch._scaled_mm` called directly with 2-D scales (the PyTorch op it wraps), and
the dense matmul in the activations' dtype that FP8 replaces. Forward only: FP8 operands take no
gradient (the fp8_dense pass differentiates the quantized matmul around them)."""
import pytest
import torch
from microbench import DEVICE, FLOAT, measure, shapes

import fvcompile  # noqa: F401
from fvcompile.kernels.fp8_scaled_mm import scaled_mm_emulated

E4M3 = torch.float8_e4m3fn


def operands(m, k, n):
    """e4m3 a (row-major) and b (column-major, as _scaled_mm wants), with row-wise scales."""
    a = torch.randn(m, k, device=DEVICE).to(E4M3)
    b = torch.randn(n, k, device=DEVICE).to(E4M3).t()
    return a, b, torch.rand(m, device=DEVICE) + 0.5, torch.rand(n, device=DEVICE) + 0.5


IMPLS = {
    "fvcompile": lambda a, b, sa, sb: torch.ops.fvcompile.fp8_scaled_mm(a, b, sa, sb, out_dtype=FLOAT),
    "reference": scaled_mm_emulated,
    "torch._scaled_mm": lambda a, b, sa, sb: torch._scaled_mm(a, b, scale_a=sa[:, None], scale_b=sb[None, :],
                                                              out_dtype=torch.bfloat16),
    "torch.mm (dense)": None,  # the matmul in FLOAT that FP8 replaces; its operands made below
}


@pytest.mark.parametrize("shape", shapes("matmul"), ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fp8_scaled_mm(benchmark, impl, shape):
    a, b, sa, sb = operands(*shape)
    if IMPLS[impl] is None:
        measure(benchmark, f"fp8_scaled_mm fwd {shape}", torch.mm, [a.to(FLOAT), b.to(FLOAT)], "fwd")
        return
    measure(benchmark, f"fp8_scaled_mm fwd {shape}", IMPLS[impl], [a, b, sa, sb], "fwd")
