"""The 2:4 ops (kernels/sparse24_*.py, relu2_sparse24_pack.py) against their references and the
PyTorch ops that do the same job: `torch._sparse_semi_structured_tile` (select and pack in
CUTLASS's layout) and `to_sparse_semi_structured` matmuls on CUDA, and everywhere the dense op
each one replaces (relu, mm), the baseline a pass must beat."""
import pytest
import torch
from microbench import DEVICE, DIRECTIONS, FLOAT, HALF, measure, needs, shapes

import fvcompile  # noqa: F401  (registers the ops)
from fvcompile.kernels.sparse24 import (row_col_max, sparse24_mask_reference, sparse24_relu_max_reference,
                                        sparse24_relu_reference, squared)
from fvcompile.kernels.sparse24_cutlass import pack_reference
from fvcompile.kernels import relu2_sparse24_pack as _pack_op  # noqa: F401
from fvcompile.kernels import sparse24_mm as _mm_op  # noqa: F401
from fvcompile.kernels import sparse24_relu as _relu_op  # noqa: F401
from fvcompile.kernels import sparse24_relu_max as _relu_max_op  # noqa: F401
from fvcompile.kernels import sparse24_weight_grad_mm as _wg_op  # noqa: F401

ops = torch.ops.fvcompile


def rand(*shape, dtype=FLOAT, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=None).requires_grad_(grad)


def semi_structured_mm(a, b):
    """PyTorch's own 2:4 matmul: the masked `a` compressed (to_sparse_semi_structured), then mm."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(sparse24_mask_reference(a)) @ b


# op -> {implementation: (function, directions it has, what it needs)}
RELU = {
    "fvcompile": lambda h: ops.sparse24_relu(h),
    "reference": sparse24_relu_reference,
    "torch.relu (dense)": torch.relu,
}
RELU_MAX = {
    "fvcompile": lambda h: ops.sparse24_relu_max(h),
    "reference": sparse24_relu_max_reference,
    "torch relu+amax (dense)": lambda h: (lambda r: (r, *row_col_max(r)))(torch.relu(h)),
}
MM = {
    "fvcompile": lambda a, b: ops.sparse24_mm(a, b),
    "reference": lambda a, b: sparse24_mask_reference(a) @ b,
    "torch.mm (dense)": torch.mm,
    "torch semi-structured": semi_structured_mm,
}
# Neighbouring tokens grouped (strided_k=False): the formula the reference computes.
WEIGHT_GRAD_MM = {
    "fvcompile": lambda a, b: ops.sparse24_weight_grad_mm(a, b, strided_k=False),
    "reference": lambda a, b: sparse24_mask_reference(a) @ b,
    "torch.mm (dense)": torch.mm,
}
PACK = {
    "fvcompile": lambda x: ops.sparse24_pack(x),
    "reference": lambda x: pack_reference(sparse24_mask_reference(x)),
    "torch._sparse_semi_structured_tile": lambda x: torch._sparse_semi_structured_tile(x),
}
RELU2_PACK = {
    "fvcompile": lambda h: ops.relu2_sparse24_pack(h),
    "reference": lambda h: pack_reference(squared(sparse24_relu_reference(h))),
    "torch._sparse_semi_structured_tile": lambda h: torch._sparse_semi_structured_tile(squared(torch.relu(h))),
}


@pytest.mark.parametrize("shape", shapes("rows"), ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(RELU))
def test_sparse24_relu(benchmark, impl, direction, shape):
    measure(benchmark, f"sparse24_relu {direction} {shape}", RELU[impl], [rand(*shape, grad=True)], direction)


@pytest.mark.parametrize("shape", shapes("rows"), ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(RELU_MAX))
def test_sparse24_relu_max(benchmark, impl, direction, shape):
    measure(benchmark, f"sparse24_relu_max {direction} {shape}", RELU_MAX[impl], [rand(*shape, grad=True)],
            direction)


@pytest.mark.parametrize("shape", shapes("matmul"), ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(MM))
def test_sparse24_mm(benchmark, impl, direction, shape):
    m, k, n = shape
    if impl == "torch semi-structured":
        needs(DEVICE == "cuda" and direction == "fwd", "PyTorch's 2:4 matmul: CUDA, forward only")
    measure(benchmark, f"sparse24_mm {direction} {shape}", MM[impl], [rand(m, k, grad=True), rand(k, n, grad=True)],
            direction)


@pytest.mark.parametrize("shape", shapes("matmul"), ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", list(WEIGHT_GRAD_MM))
def test_sparse24_weight_grad_mm(benchmark, impl, direction, shape):
    hidden, tokens, n = shape  # sᵀ (hidden, tokens) @ g (tokens, n)
    measure(benchmark, f"sparse24_weight_grad_mm {direction} {shape}", WEIGHT_GRAD_MM[impl],
            [rand(hidden, tokens, grad=True), rand(tokens, n, grad=True)], direction)


@pytest.mark.parametrize("shape", shapes("rows"), ids=str)
@pytest.mark.parametrize("impl", list(PACK))
def test_sparse24_pack(benchmark, impl, shape):
    if impl.startswith("torch."):
        needs(DEVICE == "cuda", "torch._sparse_semi_structured_tile runs on CUDA only")
    measure(benchmark, f"sparse24_pack fwd {shape}", PACK[impl], [rand(*shape, dtype=HALF)], "fwd")


@pytest.mark.parametrize("shape", shapes("rows"), ids=str)
@pytest.mark.parametrize("impl", list(RELU2_PACK))
def test_relu2_sparse24_pack(benchmark, impl, shape):
    if impl.startswith("torch."):
        needs(DEVICE == "cuda", "torch._sparse_semi_structured_tile runs on CUDA only")
    measure(benchmark, f"relu2_sparse24_pack fwd {shape}", RELU2_PACK[impl], [rand(*shape, dtype=HALF)], "fwd")
