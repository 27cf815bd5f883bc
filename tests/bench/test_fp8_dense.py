"""The dense FP8 baseline of the sparse24 benchmark (bench/fp8_dense.py): a baseline that computed
the wrong thing would make any speedup meaningless, so it is checked like a kernel."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from fp8_dense import Fp8SquaredReLU  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_ffn_forward_and_backward_are_the_ffn_within_fp8_error():
    torch.manual_seed(1)
    model = Fp8SquaredReLU(64, 256)
    x = torch.randn(2, 32, 64, requires_grad=True)
    out = model(x)
    out.backward(torch.ones_like(out))
    got = (out, x.grad, model.w1.weight.grad, model.w2.weight.grad)
    x_ref = x.detach().clone().requires_grad_()
    w1 = model.w1.weight.detach().clone().requires_grad_()
    w2 = model.w2.weight.detach().clone().requires_grad_()
    ref = torch.relu(x_ref @ w1.t()).square() @ w2.t()
    ref.backward(torch.ones_like(ref))
    for g, r in zip(got, (ref, x_ref.grad, w1.grad, w2.grad)):
        assert 1e-4 < rel(g, r) < 0.1, rel(g, r)  # quantized (not exact), within e4m3's error
