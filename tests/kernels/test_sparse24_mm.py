"""The 2:4 matmul ops `sparse24_mm` (forward, dX) and `sparse24_weight_grad_mm` (K = tokens)
against masked dense matmuls (CPU: their emulation; a GPU with 2:4 sparse tensor cores: the real
sparse matmul)."""
import pytest
import torch

import fvcompile.kernels  # noqa: F401 - registers the ops
from fvcompile.kernels import sparse24 as s24
from test_sparse24 import MM_TOL, randn  # tests/kernels/, beside this file


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_mm_equals_masked_dense(dtype):
    a = s24.sparse24_relu_reference(randn(50, 128, dtype=dtype))
    b = randn(128, 24, dtype=dtype)
    out = torch.ops.fvcompile.sparse24_mm(a, b)
    assert out.shape == (50, 24) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), a.float() @ b.float(), **MM_TOL[dtype])
    # autograd: the gradient of mask24(a) @ b
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    torch.ops.fvcompile.sparse24_mm(a1, b1).sum().backward()
    (torch.where(s24.mask24(a2.detach().abs()), a2, 0) @ b2).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, **MM_TOL[dtype])
    torch.testing.assert_close(b1.grad, b2.grad, **MM_TOL[dtype])


@pytest.mark.parametrize("square, relu, transpose_out", [(True, False, False), (True, True, False),
                                                          (False, True, False), (True, False, True)])
def test_sparse24_mm_square_and_relu_prologues(square, relu, transpose_out):
    """square: mask24(a)² @ b; relu: mask24(relu(a))[²] @ b; transpose_out: (...)ᵀ, contiguous;
    forward and autograd vs the formula."""
    a, b = randn(40, 128, dtype=torch.float64), randn(128, 16, dtype=torch.float64)

    def formula(a, b):
        x = torch.relu(a) if relu else a
        x = torch.where(s24.mask24(x.detach().abs()), x, 0)
        out = (x * x if square else x) @ b
        return out.t() if transpose_out else out

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    g = randn(*((16, 40) if transpose_out else (40, 16)), dtype=torch.float64)
    if transpose_out:  # a weight gradient's layout: the op of that role (no relu prologue there)
        out = torch.ops.fvcompile.sparse24_weight_grad_mm(a1, b1, square=square, transpose_out=True, strided_k=False)
    else:
        out = torch.ops.fvcompile.sparse24_mm(a1, b1, select=not relu, square=square, relu=relu)
    assert out.is_contiguous()
    expected = formula(a2, b2)
    torch.testing.assert_close(out, expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_mm_select(dtype):
    """select=True (default) applies the 2:4 selection; select=False trusts `a` to be 2:4."""
    a, b = randn(40, 128, dtype=dtype), randn(128, 16, dtype=dtype)  # a is dense, not 2:4
    masked = s24.sparse24_mask_reference(a)
    torch.testing.assert_close(torch.ops.fvcompile.sparse24_mm(a, b).float(), masked.float() @ b.float(),
                               **MM_TOL[dtype])
    torch.testing.assert_close(torch.ops.fvcompile.sparse24_mm(masked, b, select=False).float(),
                               masked.float() @ b.float(), **MM_TOL[dtype])


@pytest.mark.parametrize("k", [64, 18])  # 18: padded to 64 like any K
def test_sparse_mm_strided_k_selects_in_the_strided_order(k):
    from fvcompile.kernels.sparse24_cslt import strided_order

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(12, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.ops.fvcompile.sparse24_weight_grad_mm(a, b)  # strided_k=True, its default
    order = strided_order(64)  # K padded with zeros to 64 first
    padded = torch.nn.functional.pad(a.detach(), (0, 64 - k))
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep[:, order] = s24.mask24(padded[:, order].abs())
    keep = keep[:, :k]
    expected = torch.where(keep, a.detach(), 0) @ b.detach()
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, torch.ops.fvcompile.sparse24_weight_grad_mm(a, b, strided_k=False))  # it matters
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(a.grad, (torch.ones_like(out) @ b.detach().t()) * keep)
    torch.testing.assert_close(b.grad, torch.where(keep, a.detach(), 0).t() @ torch.ones_like(out))
