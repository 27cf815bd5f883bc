"""The sparse24 pass down the path a Hopper GPU takes, run on CPU.

The device is told it has a cuSPARSELt backend, and `torch._cslt_sparse_mm` is replaced by a
stand-in that unpacks our cuSPARSELt layout (the reference unpacker, itself checked against
bytes an H100 wrote) and multiplies densely. Everything else is the real code: the pass's
rewrites (the forward reading r or h, dX, the token-wise dW2), the op's padding and slicing, and
the Triton pack kernel (in the interpreter, on the CPU tensors of a codegen=False graph).
"""
import copy

import pytest
import torch

import fvcompile
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels.sparse24_cslt import cslt_sparse_mm_reference
from fvcompile.passes.sparse24 import Sparse24

from test_sparse24_pass import (MM24, RELU24, AllSparseWeightGrads, SquaredReluFFN, reference,
                               reference_token_sparse_weight_grad, run_step, sites)

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real path")

TOL = dict(atol=2e-2, rtol=2e-2)  # fp16 operands


@pytest.fixture(autouse=True)
def hopper_on_cpu(monkeypatch):
    calls = []

    def cslt_sparse_mm(compressed, b, transpose_result=False, **kwargs):
        calls.append((tuple(compressed.shape), transpose_result))
        return cslt_sparse_mm_reference(compressed, b, transpose_result=transpose_result, **kwargs)

    def no_search(*args, **kwargs):
        raise RuntimeError("no algorithm search in the stand-in")

    monkeypatch.setattr(backends, "sparse_mm_backend", lambda device: "cusparselt")
    monkeypatch.setattr(backends, "sparse_tensor_cores_available", lambda device: True)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", cslt_sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", no_search, raising=False)
    torch._dynamo.reset()
    yield calls
    torch._dynamo.reset()


def half_model(**kwargs):
    """An fp16 FFN (what the sparse matmul packs) and an fp32 copy for the reference."""
    torch.manual_seed(5)
    model = SquaredReluFFN(dim=64, hidden=128, **kwargs).half()
    return model, copy.deepcopy(model).float()


def close(got, expected):
    out, grads = got
    out_ref, grads_ref = expected
    torch.testing.assert_close(out.float(), out_ref.float(), **TOL)
    for name in grads_ref:
        torch.testing.assert_close(grads[name].float(), grads_ref[name].float(), **TOL)


@pytest.mark.parametrize("tokens", [64, 37])  # 37: rows padded to 64 and sliced back
def test_training_step_on_the_cusparselt_path(hopper_on_cpu, tokens):
    model, ref = half_model(bias=True)
    x, grad_out = torch.randn(1, tokens, 64).half(), torch.randn(1, tokens, 64).half()
    optimized = fvcompile.optimize(model, passes=["sparse24"], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    close(got, run_step(lambda t: reference(ref, t), ref, x.float(), grad_out.float()))
    (site,) = sites(optimized)
    assert site.ops[MM24] == 2 and "(reads r, squares as it packs)" in site.detail
    assert "emulated" not in site.detail
    assert len(hopper_on_cpu) == 2  # the forward matmul and dX went through the sparse matmul
    notes = [n for r in optimized.fvcompile_report.pass_runs() for n in r.result.notes]
    assert any("mode='reduce-overhead'" in n for n in notes)  # the host's per-call plan cost, and the way out


def test_inference_reads_h_on_the_cusparselt_path(hopper_on_cpu):
    model, ref = half_model()
    optimized = fvcompile.optimize(model, passes=["sparse24"], codegen=False, dynamic=True)
    with torch.no_grad():
        for tokens in (10, 64):
            x = torch.randn(2, tokens, 64).half()
            torch.testing.assert_close(optimized(x).float(), reference(ref, x.float()), **TOL)
    (site,) = sites(optimized)
    assert site.ops[MM24] == 1 and RELU24 not in site.ops  # reads h: relu, 2:4, square and pack in one pass


@pytest.mark.parametrize("tokens", [32, 45])  # 90 tokens: the weight gradient's K padded to 128 in the kernel
def test_token_sparse_weight_grad_on_the_cusparselt_path(hopper_on_cpu, tokens):
    model, ref = half_model()
    x, grad_out = torch.randn(2, tokens, 64).half(), torch.randn(2, tokens, 64).half()
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad=True)], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    close(got, run_step(lambda t: reference_token_sparse_weight_grad(ref, t), ref, x.float(), grad_out.float()))
    assert len(hopper_on_cpu) == 3  # forward, dX and dW2, whatever the token count
    # dW2 comes out of the sparse matmul in the weight's layout: (Aᵀ dY)ᵀ, no transposing copy.
    assert sorted(t for _, t in hopper_on_cpu) == [False, False, True]


def test_all_weight_grads_on_the_cusparselt_path(hopper_on_cpu):
    model, ref = half_model()
    x, grad_out = torch.randn(2, 32, 64).half(), torch.randn(2, 32, 64).half()
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad="all")], codegen=False)
    got = run_step(optimized, model, x, grad_out)

    def expected(t):
        return AllSparseWeightGrads.apply(t.reshape(-1, 64), ref.w1.weight, ref.w2.weight).reshape(t.shape)

    close(got, run_step(expected, ref, x.float(), grad_out.float()))
    assert len(hopper_on_cpu) == 4  # forward, dX, dW2 and dW1: all four through the sparse matmul


@pytest.mark.parametrize("scales_in_matmul", [True, False])
@pytest.mark.parametrize("tokens", [32, 45])  # 90 tokens: rows padded, the weight gradients' K padded to 128
def test_fp8_all_weight_grads_on_the_cusparselt_path(hopper_on_cpu, monkeypatch, tokens, scales_in_matmul):
    """FP8 with all four matmuls sparse: the Hopper path (FP8 pack, B quantized column-major, the
    stand-in FP8 matmul scaling in its epilogue, or the rescale kernel after it) gives the numbers of
    the FP8 emulation (the formula in plain PyTorch). The interpreter rounds to FP8 its own way, so here the pack and the B
    quantization are their PyTorch references (the kernels equal them on GPUs: test_sparse24_cslt,
    test_sparse24_fp8): this checks the plumbing (scales, transposes, padding) of all four."""
    from fvcompile.kernels import sparse24_cslt as cslt
    from fvcompile.kernels import sparse24_fp8 as f8

    monkeypatch.setattr(cslt, "cslt_pack_triton", cslt.cslt_pack_reference)
    monkeypatch.setattr(f8, "quantize_column_major_triton", f8.quantize_column_major_reference)
    monkeypatch.setattr(backends, "fp8_sparse_mm_available", lambda device: True)
    monkeypatch.setattr(backends, "fp8_scales_in_matmul", lambda device: scales_in_matmul)
    model, _ = half_model()
    emulated_model = copy.deepcopy(model)
    x, grad_out = torch.randn(2, tokens, 64).half(), torch.randn(2, tokens, 64).half()
    optimized = fvcompile.optimize(model, passes=[Sparse24(fp8=True, sparse_weight_grad="all")], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    assert len(hopper_on_cpu) == 4  # forward, dX, dW2 and dW1, each an FP8 sparse matmul
    (site,) = sites(optimized)
    assert ("applied in cuSPARSELt's epilogue" in site.detail) == scales_in_matmul, site.detail

    monkeypatch.setattr(backends, "sparse_mm_backend", lambda device: None)  # now a device without one
    monkeypatch.setattr(backends, "sparse_tensor_cores_available", lambda device: False)
    torch._dynamo.reset()
    emulated = fvcompile.optimize(emulated_model, passes=[Sparse24(fp8=True, sparse_weight_grad="all")],
                                  codegen=False)
    expected = run_step(emulated, emulated_model, x, grad_out)
    assert len(hopper_on_cpu) == 4  # the emulation did not call it
    # The rescale pass rounds the product to bf16 first (2⁻⁹) where the formula rounds once; it
    # scales every transposed result (dW2, in the weight's layout).
    once, twice = dict(atol=1e-3, rtol=1e-3), dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[0], expected[0], **(once if scales_in_matmul else twice))
    for name in expected[1]:
        tol = once if scales_in_matmul and name != "w2.weight" else twice
        torch.testing.assert_close(got[1][name], expected[1][name], **tol, msg=name)
