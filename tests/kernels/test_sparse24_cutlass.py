"""The CUTLASS-layout pack (kernels/sparse24_cutlass.py) vs PyTorch's own conversion, in the Triton
interpreter on CPU and on CUDA tensors on a GPU: exact, since packing moves values without
arithmetic (bf16 inputs whose squares are exact: the interpreter rounds fp32 -> bf16 by truncation)."""
import pytest
import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels import sparse24_cutlass as cutlass
from test_sparse24 import DEVICE, PACK_DTYPES, SHAPES, exact_square_inputs, randn

pytest.importorskip("triton")


def pack_inputs(shape, dtype):
    return exact_square_inputs(*shape, dtype) if dtype == torch.bfloat16 else randn(*shape, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_relu2_pack_layout_equals_pytorch_cutlass(shape, dtype):
    h = pack_inputs(shape, dtype)
    values, meta = cutlass.relu2_sparse24_pack_triton(h)
    r = s24.sparse24_relu_reference(h)
    ref_values, ref_meta = cutlass.pack_reference(r * r)
    m_pad = -(-shape[0] // 32) * 32
    assert values.shape == (m_pad, shape[1] // 2) and meta.shape == (m_pad, shape[1] // 16)
    assert values.dtype == dtype and meta.dtype == torch.int16
    assert torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_relu2_pack_then_unpack_is_the_masked_dense(shape, dtype):
    h = pack_inputs(shape, dtype)
    values, meta = cutlass.relu2_sparse24_pack_triton(h)
    dense = cutlass.unpack_reference(values.cpu(), meta.cpu(), values.shape[0])
    r = s24.sparse24_relu_reference(h).cpu()
    assert torch.equal(dense[: shape[0]], r * r)
    assert not dense[shape[0]:].any()  # padding rows are zero


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_magnitude_pack(shape, dtype):
    x = randn(*shape, dtype=dtype)
    values, meta = cutlass.sparse24_pack_triton(x)
    masked = s24.sparse24_mask_reference(x)
    m_pad = values.shape[0]
    padded = torch.nn.functional.pad(masked, (0, 0, 0, m_pad - shape[0]))
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(padded)
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)
    # A tensor that already is 2:4 (like dH) packs exactly.
    v2, m2 = cutlass.sparse24_pack_triton(masked)
    assert torch.equal(cutlass.unpack_reference(v2.cpu(), m2.cpu(), shape[0]), masked.cpu())


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_pack_reads_strided_views_and_ragged_tiles(dtype):
    # K = 544: two 256-wide tiles and a part; a transposed view is read in place.
    xt = randn(544, 40, dtype=dtype).t()
    padded = torch.nn.functional.pad(s24.sparse24_mask_reference(xt), (0, 0, 0, 24))
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(padded)
    for blocks in ({}, dict(block_m=32, block_k=64)):
        values, meta = cutlass.sparse24_pack_triton(xt, **blocks)
        assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta), blocks


def test_pack_rejects_what_cutlass_cannot_hold():
    with pytest.raises(ValueError, match="fp16 or bf16"):
        cutlass.sparse24_pack_triton(torch.randn(32, 64, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of 32"):
        cutlass.relu2_sparse24_pack_triton(torch.randn(32, 16, device=DEVICE, dtype=torch.float16))
