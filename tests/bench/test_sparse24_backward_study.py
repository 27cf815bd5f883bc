"""The emulated all-sparse FFN of bench/diag/sparse24_backward_study.py: with every feature kept dense
its gradients are the exact gradients of the sparse forward; otherwise its token-wise operands
are 2:4 along tokens, in the permuted order."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "diag"))
from sparse24_backward_study import AllSparseFFN, token_order, token_sparse  # noqa: E402

from fvcompile.kernels.sparse24 import sparse24_relu_reference


def test_all_features_dense_gives_the_exact_gradients():
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=True)
    w1, w2 = torch.randn(64, 16, requires_grad=True), torch.randn(16, 64, requires_grad=True)
    y = AllSparseFFN.apply(x, w1, w2, 1.0, "random")
    y.backward(torch.ones_like(y))
    xr, w1r, w2r = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    r = torch.relu(xr @ w1r.t()) * (sparse24_relu_reference(xr @ w1r.t()) > 0)
    yr = (r * r) @ w2r.t()
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr)
    for got, expected in ((x.grad, xr.grad), (w1.grad, w1r.grad), (w2.grad, w2r.grad)):
        torch.testing.assert_close(got, expected)


def test_token_sparse_keeps_2_of_4_tokens_in_permuted_order_except_dense_columns():
    torch.manual_seed(1)
    m = torch.randn(18, 40)  # 18 tokens: the last group is short
    m[:, 7] = 5.0  # the densest column... all are dense here: pick by count, ties broken by topk
    perm = torch.randperm(18)
    out = token_sparse(m, 0.0, perm)
    grouped = torch.nn.functional.pad(out[perm], (0, 0, 0, 2)).reshape(5, 4, 40)
    assert ((grouped != 0).sum(1) <= 2).all()
    kept = out != 0
    assert torch.equal(out[kept], m[kept])
    sparse_m = m.clone()
    sparse_m[:, :20] *= torch.rand(18, 20) < 0.2  # columns 20..39 dense, 0..19 mostly zero
    out = token_sparse(sparse_m, 0.5, None)
    assert torch.equal(out[:, 20:], sparse_m[:, 20:])  # the densest half kept whole


def test_strided_order_groups_tokens_a_quarter_apart():
    order = token_order(10, "strided")  # quarters of 3: [0 3 6 9] [1 4 7] [2 5 8]
    assert order.tolist() == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    assert sorted(token_order(4064, "strided").tolist()) == list(range(4064))
