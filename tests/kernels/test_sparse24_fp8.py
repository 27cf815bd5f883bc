"""FP8 2:4 matmuls (kernels/sparse24_fp8.py): the reference formula, the op, and the Hopper path on
CPU (our FP8 pack in the Triton interpreter + a stand-in for `torch._cslt_sparse_mm` that unpacks
cuSPARSELt's FP8 layout, itself checked against bytes an H200 wrote)."""
import pytest
import torch

from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_cslt as cslt
from fvcompile.kernels import sparse24_fp8 as f8
from fvcompile.kernels import sparse24_mm  # noqa: F401 - registers the sparse24_mm op
from fvcompile.kernels.fp8_scaled_mm import scaled_mm_emulated
from fvcompile.kernels.sparse24_cslt import cslt_sparse_mm_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLAGS = [dict(select=True, square=False, relu=False), dict(select=False, square=True, relu=False),
         dict(select=False, square=True, relu=True)]


def exact_operands(m, k, n, seed):
    a, b = f8.fp8_exact_operands(m, k, n, seed)
    return a.to(DEVICE), b.to(DEVICE)


@pytest.mark.parametrize("transpose_out", [False, True])
def test_reference_is_exact_where_quantizing_is(transpose_out):
    a, b = exact_operands(40, 128, 24, seed=0)
    out = f8.fp8_mm_reference(a, b, transpose_out=transpose_out)
    expected = (s24.sparse24_mask_reference(a).double() @ b.double()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected.t() if transpose_out else expected, atol=0, rtol=0)


@pytest.mark.parametrize("flags", FLAGS)
def test_reference_is_the_sparse_product_within_fp8_error(flags):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(64, 256, generator=gen).to(DEVICE)
    b = torch.randn(256, 48, generator=gen).to(DEVICE)
    out = f8.fp8_mm_reference(a, b, transpose_out=False, **flags)
    operand = torch.relu(a) if flags["relu"] else a
    operand = s24.sparse24_mask_reference(operand) if flags["select"] or flags["relu"] else operand
    exact = (operand ** 2 if flags["square"] else operand) @ b
    error = ((out - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 0.05, error  # quantized (not exact), within e4m3's 3 mantissa bits


def test_scales_map_each_row_maximum_to_448():
    a = torch.tensor([[1.0, -8.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(f8.row_scale(a, square=False, relu=False), torch.tensor([8 / 448, 1e-12 / 448]))
    torch.testing.assert_close(f8.row_scale(a, square=True, relu=True)[0], torch.tensor(4 / 448))
    torch.testing.assert_close(f8.tensor_scale(a), torch.tensor(8 / 448))


def test_op_emulates_the_reference_and_its_gradient_passes_straight_through():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(32, 128, generator=gen).requires_grad_()
    b = torch.randn(128, 16, generator=gen).requires_grad_()
    out = torch.ops.fvcompile.sparse24_mm(a, b, fp8=True)
    assert torch.equal(out, f8.fp8_mm_reference(a.detach(), b.detach()))
    out.backward(torch.ones_like(out))
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.ops.fvcompile.sparse24_mm(a2, b2).backward(torch.ones_like(out))
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_column_major_kernel(transposed):
    a, b = exact_operands(8, 72, 200, seed=4)  # b (72, 200): blocks of 64 leave ragged edges
    b = b.t().contiguous().t() if transposed else b  # a column-major input is read in place
    scale = torch.tensor(0.25, device=DEVICE)  # exact: b's values are e4m3 numbers / 4
    got = f8.quantize_column_major_triton(b, scale)
    assert got.shape == b.shape and got.stride() == (1, 72) and got.dtype == f8.FP8
    assert torch.equal(got.view(torch.uint8), f8.quantize(b, scale).view(torch.uint8))
    # A weight gradient's dense operand: rows (tokens) read into the strided order, K padded to 128
    # and N to 208 with zeros, in the same pass.
    got = f8.quantize_column_major_triton(b, scale, strided_k=True, n_multiple=16)
    assert got.shape == (128, 208) and got.stride() == (1, 128)
    expected = f8.quantize(torch.nn.functional.pad(b, (0, 8, 0, 56))[cslt.strided_order(128, DEVICE)], scale)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(f8.quantize_column_major_reference(b, scale, strided_k=True, n_multiple=16).view(torch.uint8),
                       expected.view(torch.uint8))
    big = torch.full((64, 16), 1000.0, device=DEVICE, dtype=torch.bfloat16)  # saturates at 448
    assert torch.equal(f8.quantize_column_major_triton(big, torch.tensor(1.0, device=DEVICE)).float(),
                       torch.full((64, 16), 448.0, device=DEVICE))


@pytest.fixture
def cusparselt_fp8_on_cpu(monkeypatch):
    def cslt_sparse_mm(compressed, b, **kwargs):
        assert compressed.dtype == f8.FP8 and b.dtype == f8.FP8 and b.stride(0) == 1  # B column-major
        assert kwargs["out_dtype"] in (torch.float16, torch.bfloat16)  # FP8 output is never asked for
        # nor a transposed result: cuSPARSELt's search skips those, and FP8's default algorithm is slow
        assert not kwargs.get("transpose_result")
        return cslt_sparse_mm_reference(compressed, b, **kwargs)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", cslt_sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 0, raising=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="a stand-in for the CUDA-only matmul")
@pytest.mark.parametrize("scales_in_matmul", [True, False])
@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("m", [64, 37])
def test_hopper_path_equals_the_reference(cusparselt_fp8_on_cpu, transpose_out, m, scales_in_matmul):
    a, b = exact_operands(m, 128, 24, seed=m)  # 24 columns: padded to 16s for FP8, sliced back
    got = f8.fp8_mm_cusparselt(a, b, transpose_out=transpose_out, scales_in_matmul=scales_in_matmul)
    expected = f8.fp8_mm_reference(a, b, transpose_out=transpose_out)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="a stand-in for the CUDA-only matmul")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scales_in_the_matmul_round_once(cusparselt_fp8_on_cpu, monkeypatch, dtype):
    """On random operands the epilogue's scaling is the formula to the bit: fp32 product, fp32 scale,
    one rounding; the bf16 product + rescale pass rounds twice (as every transposed result does).
    The interpreter rounds to FP8 its own way: the pack and B's quantization are their references
    here (the kernels equal them on GPUs: test_sparse24_cslt, and the column-major test above)."""
    monkeypatch.setattr(cslt, "cslt_pack_triton", cslt.cslt_pack_reference)
    monkeypatch.setattr(f8, "quantize_column_major_triton", f8.quantize_column_major_reference)
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(70, 128, generator=gen).to(dtype)
    b = torch.randn(128, 32, generator=gen).to(dtype)
    expected = f8.fp8_mm_reference(a, b)
    assert expected.dtype == dtype
    got = f8.fp8_mm_cusparselt(a, b, scales_in_matmul=True)
    assert torch.equal(got, expected)
    twice = f8.fp8_mm_cusparselt(a, b, scales_in_matmul=False)
    # bf16's rounding (2⁻⁹), then a's dtype's: an fp16 ulp, or two bf16 ulps (the interpreter truncates)
    torch.testing.assert_close(twice, expected, atol=1e-2, rtol=2 ** -8 if dtype == torch.float16 else 2 ** -6)
    assert not torch.equal(twice, expected)  # the second rounding shows on random operands


@pytest.mark.skipif(DEVICE != "cpu", reason="a stand-in for the CUDA-only matmul")
@pytest.mark.parametrize("epilogue", ["ignores alpha", "scales columns", "rejects alpha"])
def test_probe_tells_whether_the_matmul_scales_fp8_products(cusparselt_fp8_on_cpu, monkeypatch, epilogue):
    """An epilogue that ignores the alpha vector, applies it along the wrong axis or fails: the
    probe says no, and the plain FP8 matmul (scaled by our pass after it) still passes."""
    plain = torch._cslt_sparse_mm

    def wrong_epilogue(compressed, b, alpha=None, transpose_result=False, **kwargs):
        out = plain(compressed, b, transpose_result=transpose_result, **kwargs)
        if alpha is None or epilogue == "ignores alpha":
            return out
        if epilogue == "rejects alpha":
            raise RuntimeError("CUDA error: an alpha vector")
        out = out.float() * alpha[: out.shape[-1]]  # the wrong axis: along the product's columns
        return out.to(kwargs["out_dtype"])

    monkeypatch.setattr(torch, "_cslt_sparse_mm", wrong_epilogue)
    assert backends.fp8_probe("cpu", scales_in_matmul=True) == "no"
    assert backends.fp8_probe("cpu") == "yes"


@pytest.mark.skipif(DEVICE != "cpu", reason="a stand-in for the CUDA-only matmul")
def test_probe_child_reports_what_the_parent_reads(cusparselt_fp8_on_cpu, monkeypatch, capsys):
    monkeypatch.setattr(backends, "first_working_backend", lambda device: "cusparselt")
    backends.probe_report("cpu")
    assert capsys.readouterr().out.splitlines() == ["backend: cusparselt", "fp8: yes", "fp8 scales in matmul: yes"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_rescale_kernel_equals_the_formula(dtype, transpose_out):
    gen = torch.Generator().manual_seed(5)
    # A padded bf16 matmul output, as large as an unscaled FP8 product gets (448² · K: past fp16's range).
    padded = (torch.randn(70, 150, generator=gen) * 448 ** 2 * 64).to(f8.PRODUCT).to(DEVICE)
    product = padded[:67, :131]  # sliced: strided, ragged against the blocks
    sa = torch.rand(67, generator=gen).to(DEVICE) / 448  # per row of the product
    sb = torch.tensor(0.37 / 448, device=DEVICE)
    got = f8.rescale_triton(product, sa, sb, transpose_out, dtype)
    assert got.shape == ((131, 67) if transpose_out else (67, 131))
    assert got.is_contiguous() and got.dtype == dtype and torch.isfinite(got).all()
    expected = f8.rescale(product, sa, sb, transpose_out, dtype)
    ulps = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs().max().item()
    # The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest): one ulp there.
    assert ulps <= (1 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0)


@pytest.mark.parametrize("flags", FLAGS)
def test_a_max_from_an_earlier_pass_gives_the_same_numbers(flags):
    """sparse24_mm(a_max=): the FP8 scale from maxima the caller has (sparse24_relu_max) is the
    scale the matmul would compute: a row's largest value is always kept by the 2:4 selection."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(64, 256, generator=gen).to(DEVICE)
    b = torch.randn(256, 48, generator=gen).to(DEVICE)
    a_max = (torch.relu(a) if flags["relu"] else a).abs().amax(1)
    for transpose_out in (False, True):
        expected = f8.fp8_mm_reference(a, b, transpose_out=transpose_out, **flags)
        assert torch.equal(f8.fp8_mm_reference(a, b, transpose_out=transpose_out, a_max=a_max, **flags), expected)


@pytest.mark.skipif(DEVICE != "cpu", reason="a stand-in for the CUDA-only matmul")
def test_hopper_path_with_a_max(cusparselt_fp8_on_cpu):
    a, b = exact_operands(64, 128, 24, seed=3)
    a_max = s24.sparse24_mask_reference(a).float().abs().amax(1)
    got = f8.fp8_mm_cusparselt(a, b, a_max=a_max)
    torch.testing.assert_close(got, f8.fp8_mm_reference(a, b), atol=0, rtol=0)


def test_dense_rowwise_fp8_mm_is_exact_where_quantizing_is():
    """fp8_rowwise_mm, the FFN's dense FP8 matmuls: where every row of a and column of b has max
    |value| 448 and e4m3 values, the scales are 1 and nothing rounds but the bf16 result."""
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(16, 64, generator=gen) * 32).to(f8.FP8).float()
    b = (torch.randn(64, 32, generator=gen) * 32).to(f8.FP8).float()  # K and N in 16s, as CUDA's needs
    a[:, 0], b[0, :] = 448.0, -448.0
    a, b = a.to(DEVICE), b.to(DEVICE)
    got = f8.fp8_rowwise_mm(a, b, torch.float32)
    expected = (a @ b).bfloat16().float()
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (~1e-3 of the largest entry)
    atol = 2e-3 * expected.abs().max().item() if DEVICE == "cuda" else 0
    torch.testing.assert_close(got, expected, atol=atol, rtol=2 ** -8)
    # Scaled rows and columns come back scaled: each operand's scales along K.
    powers = 2.0 ** torch.arange(16, device=DEVICE)[:, None]
    torch.testing.assert_close(f8.fp8_rowwise_mm(a * powers, b * 0.5, torch.float32), got * powers * 0.5,
                               atol=0, rtol=0)


def test_scaled_mm_emulation_is_scaled_mm():
    """What GPUs without FP8 tensor cores run instead of _scaled_mm: the same numbers (CPU's _scaled_mm)."""
    gen = torch.Generator().manual_seed(6)
    a8 = (torch.randn(40, 64, generator=gen) * 20).to(f8.FP8).to(DEVICE)
    b8 = (torch.randn(32, 64, generator=gen) * 20).to(f8.FP8).to(DEVICE).t()
    sa, sb = (torch.rand(n, generator=gen).to(DEVICE) + 0.5 for n in (40, 32))
    expected = torch._scaled_mm(a8, b8, scale_a=sa[:, None], scale_b=sb[None, :], out_dtype=torch.bfloat16)
    # Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (~1e-3 of the largest entry)
    atol = 2e-3 * expected.abs().max().item() if DEVICE == "cuda" else 0
    torch.testing.assert_close(scaled_mm_emulated(a8, b8, sa, sb), expected, atol=atol, rtol=2 ** -8)
