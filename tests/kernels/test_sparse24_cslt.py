"""Packing into cuSPARSELt's compressed format: the reference against bytes an H100 wrote, the
Triton kernel (interpreter on CPU) against the reference, and, on a GPU, the matmul it feeds.

tests/kernels/data/cslt_compress_h100.pt holds `torch._cslt_compress` outputs recorded on an H100
(torch 2.11 + CUDA 13, bench/cslt_layout_probe.py) for random 2:4 bf16 inputs whose kept values
are their column numbers.
"""
from pathlib import Path

import pytest
import torch

from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_cslt as cslt

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIXTURE = Path(__file__).parent / "data" / "cslt_compress_h100.pt"
FIXTURE_FP8 = Path(__file__).parent / "data" / "cslt_compress_fp8_h200.pt"  # float8_e4m3fn, an H200
FP8 = torch.float8_e4m3fn
SHAPES = [(1, 64), (37, 128), (64, 32), (100, 192), (130, 256)]


def randn(*shape, dtype, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def meta_codes(flat: torch.Tensor, meta_start: int, m_pad: int, k: int, element_size: int = 2) -> torch.Tensor:
    byte, nibble = cslt._meta_byte_offsets(m_pad, k, flat.device, element_size)
    return (flat[meta_start:].to(torch.int64)[byte] >> (4 * nibble)) & 15


@pytest.mark.parametrize("case", range(3))
def test_reference_writes_the_bytes_cusparselt_wrote(case):
    recorded = torch.load(FIXTURE)["cases"][case]
    dense, raw = recorded["dense"], recorded["raw"]
    m, k = dense.shape
    ours = cslt.cslt_pack_reference(dense).reshape(-1).view(torch.uint8)
    if m % cslt.ALIGN_M == 0:  # the same shape: the same bytes
        assert tuple(recorded["compressed_shape"].tolist()) == cslt.compressed_shape(m, k)
        assert torch.equal(ours, raw)
    else:  # cuSPARSELt does not pad the values (we do, with zero rows): compare what is there
        m_pad = cslt.padded_rows(m)
        assert torch.equal(ours[: m * k], raw[: m * k])
        assert torch.equal(meta_codes(ours, m_pad * k, m_pad, k)[:m], meta_codes(raw, m * k, m_pad, k)[:m])


@pytest.mark.parametrize("case", range(3))
def test_reference_writes_the_fp8_bytes_cusparselt_wrote(case):
    recorded = torch.load(FIXTURE_FP8)["cases"][case]
    dense, raw = recorded["dense"], recorded["raw"]  # kept values 1..16: exact in e4m3 and bf16
    m, k = dense.shape
    ours = cslt.cslt_pack_reference(dense.to(torch.bfloat16), out_dtype=FP8).reshape(-1).view(torch.uint8)
    m_pad = cslt.padded_rows(m)
    if m % cslt.ALIGN_M == 0:
        assert tuple(recorded["compressed_shape"].tolist()) == cslt.compressed_shape(m, k, 1)
        assert torch.equal(ours, raw)
    else:  # values unpadded there, padded here: compare what is there
        assert torch.equal(ours[: m * k // 2], raw[: m * k // 2])
        assert torch.equal(meta_codes(ours, m_pad * k // 2, m_pad, k, 1)[:m],
                           meta_codes(raw, m * k // 2, m_pad, k, 1)[:m])


def fp8_exact_inputs(m, k, seed):
    """bf16 inputs v * scale[row], v an e4m3 value and scale a power of 2, a few beyond e4m3's
    range: dividing by the scale is exact, so the packed FP8 values need no rounding (the
    interpreter rounds fp32 -> fp8 its own way; a GPU's rounding is checked by gpu_check)."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randn(m, k, generator=gen) * 64).to(FP8).float()
    v[torch.rand(m, k, generator=gen) < 0.02] = 1024.0  # saturates at 448
    scale = 2.0 ** torch.randint(-3, 4, (m,), generator=gen).float()
    return (v * scale[:, None]).to(torch.bfloat16).to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("shape", [(64, 64), (37, 128), (100, 320)])
@pytest.mark.parametrize("square", [False, True])
def test_fp8_reference_unpacks_to_the_masked_tensor_scaled(shape, square):
    x, scale = fp8_exact_inputs(*shape, seed=shape[0])
    if square:
        x = x.abs().sqrt().to(torch.bfloat16)  # not exact any more: only the reference's own contract
    packed = cslt.cslt_pack_reference(x, square=square, out_dtype=FP8, scale=scale)
    assert packed.dtype == FP8 and packed.shape == cslt.compressed_shape(*shape, 1)
    masked = s24.sparse24_mask_reference(x).float()
    expected = ((masked ** 2 if square else masked) / scale[:, None]).clamp(-448, 448).to(FP8)
    assert torch.equal(cslt.cslt_unpack_reference(packed, *shape).view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("shape", [(64, 64), (37, 128), (100, 320)])
def test_fp8_kernel_equals_reference(shape):
    x, scale = fp8_exact_inputs(*shape, seed=1)
    for s in (scale, None):
        got = cslt.cslt_pack_triton(x, out_dtype=FP8, scale=s)
        expected = cslt.cslt_pack_reference(x, out_dtype=FP8, scale=s)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    xt = x.t().contiguous().t()  # a transposed view, read in place; blocks smaller than K
    assert torch.equal(cslt.cslt_pack_triton(xt, out_dtype=FP8, scale=scale, block_m=32, block_k=64).view(torch.uint8),
                       cslt.cslt_pack_reference(x, out_dtype=FP8, scale=scale).view(torch.uint8))
    with pytest.raises(ValueError, match="multiple of 64"):
        cslt.cslt_pack_triton(x[:, :32], out_dtype=FP8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("square", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_reference_unpacks_to_the_masked_tensor(shape, dtype, square, relu):
    x = randn(*shape, dtype=dtype)
    packed = cslt.cslt_pack_reference(x, square=square, relu=relu)
    assert packed.shape == cslt.compressed_shape(*shape)
    masked = s24.sparse24_mask_reference(torch.relu(x) if relu else x)
    expected = (masked.float() ** 2).to(dtype) if square else masked
    assert torch.equal(cslt.cslt_unpack_reference(packed, *shape), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_equals_reference(shape, dtype):
    x = randn(*shape, dtype=dtype)
    assert torch.equal(cslt.cslt_pack_triton(x).view(torch.int16), cslt.cslt_pack_reference(x).view(torch.int16))


def test_kernel_squares_and_reads_transposed_views():
    # fp16: the interpreter rounds fp32 -> bf16 by truncation, so the squared bf16 case is checked on GPUs.
    x = randn(192, 100, dtype=torch.float16).t()  # (100, 192), strides (1, 100)
    for square, relu in ((False, False), (True, False), (True, True)):
        got = cslt.cslt_pack_triton(x, square=square, relu=relu)
        expected = cslt.cslt_pack_reference(x.contiguous(), square=square, relu=relu)
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    ragged_blocks = randn(50, 96, dtype=torch.float16)  # K not a multiple of the block's 128 columns
    assert torch.equal(cslt.cslt_pack_triton(ragged_blocks, block_m=16, block_k=64).view(torch.int16),
                       cslt.cslt_pack_reference(ragged_blocks).view(torch.int16))


def test_kernel_rejects_widths_it_cannot_pack():
    with pytest.raises(ValueError, match="multiple of 32"):
        cslt.cslt_pack_triton(randn(4, 48, dtype=torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuSPARSELt needs a GPU")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m", [64, 100, 4096])
def test_packed_operand_multiplies_like_the_dense_one_on_gpu(m, fp8):
    if backends.sparse_mm_backend("cuda") != "cusparselt":
        pytest.skip(f"this GPU's backend is {backends.sparse_mm_backend('cuda')}")
    x = randn(m, 512, dtype=torch.bfloat16)
    w = randn(256, 512, dtype=torch.bfloat16)  # (N, K) row-major: wᵀ is the column-major B FP8 wants
    # FP8: per row, the largest value maps to 448; e4m3 keeps 3 mantissa bits.
    scale = x.abs().amax(1).float().clamp_min(1e-12) / 448 if fp8 else None
    out_dtype = FP8 if fp8 else None
    compressed = cslt.cslt_pack_triton(x, out_dtype=out_dtype, scale=scale)
    assert torch.equal(compressed.view(torch.uint8),
                       cslt.cslt_pack_reference(x, out_dtype=out_dtype, scale=scale).view(torch.uint8))
    w = w.to(FP8) if fp8 else w
    out = torch._cslt_sparse_mm(compressed, w.t(), out_dtype=torch.bfloat16 if fp8 else None)[:m].float()
    out = out * scale[:, None] if fp8 else out
    expected = s24.sparse24_mask_reference(x).float() @ w.float().t()
    assert ((out - expected).norm() / expected.norm()).item() < (0.05 if fp8 else 1e-2)


def test_strided_order_groups_columns_a_quarter_apart():
    assert cslt.strided_order(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    with pytest.raises(ValueError, match="strided_k_padded"):
        cslt.strided_order(6)


def test_strided_k_keeps_products_and_round_trips():
    a, b = randn(5, 18, dtype=torch.float64), randn(18, 3, dtype=torch.float64)
    a_s, b_s = cslt.to_strided_k(a, 1), cslt.to_strided_k(b, 0)
    assert a_s.shape == (5, 64) and b_s.shape == (64, 3)
    assert torch.equal(a_s[:, :4], torch.stack([a[:, 0], a[:, 16], torch.zeros_like(a[:, 0]), torch.zeros_like(a[:, 0])], 1))
    torch.testing.assert_close(a_s @ b_s, a @ b)
    assert torch.equal(cslt.from_strided_k(a_s, 18), a)
    for k in (1, 63, 64, 100, 130):  # the definition: padded with zeros, then put in the strided order
        x = randn(k, 3, dtype=torch.float32)
        order = cslt.strided_order(cslt.strided_k_padded(k), x.device)
        assert torch.equal(cslt.to_strided_k(x, 0), torch.nn.functional.pad(x, (0, 0, 0, -k % 64))[order])


@pytest.mark.parametrize("fp8", [False, True])
def test_kernel_packs_in_the_strided_order(fp8):
    x, scale = randn(192, 100, dtype=torch.float16).t(), None  # a transposed view, as a weight gradient's
    if fp8:  # inputs FP8 can hold exactly (the interpreter rounds to FP8 its own way)
        x, scale = fp8_exact_inputs(100, 256, seed=3)
    out_dtype = FP8 if fp8 else None
    got = cslt.cslt_pack_triton(x, out_dtype=out_dtype, scale=scale, strided_k=True, block_k=64)
    expected = cslt.cslt_pack_reference(x.contiguous(), out_dtype=out_dtype, scale=scale, strided_k=True)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    consecutive = cslt.cslt_pack_reference(x.contiguous(), out_dtype=out_dtype, scale=scale)
    assert not torch.equal(expected.view(torch.uint8), consecutive.view(torch.uint8))
