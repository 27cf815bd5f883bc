"""The fp8_dense pass (passes/fp8_matmuls.py): every dense matmul in FP8 with row-wise scales,
against the same formula written in plain PyTorch (`fp8_rowwise_mm` in an autograd.Function)."""
import pytest
import torch
import torch.nn.functional as F
from fp8_reference import Fp8DenseLinear
from torch import nn

import fvcompile
from fvcompile.passes import pass_class
from fvcompile.passes.fp8_matmuls import DenseFP8
from fvcompile.testing import PassTestBackend

aten = torch.ops.aten
fvc = torch.ops.fvcompile


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class FFN(nn.Module):
    def __init__(self, dim=32, hidden=128, bias=False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w2(F.relu(self.w1(x)) ** 2)


def linear_reference(layer: nn.Linear, x):
    y = Fp8DenseLinear.apply(x.reshape(-1, x.shape[-1]), layer.weight).reshape(*x.shape[:-1], -1)
    return y if layer.bias is None else y + layer.bias


def reference(model: FFN, x):
    return linear_reference(model.w2, F.relu(linear_reference(model.w1, x)) ** 2)


def step(fn, model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("tokens, bias", [(24, False), (21, True)])  # 21: K of dW padded to 32
def test_every_matmul_in_fp8_forward_and_backward(tokens, bias):
    torch.manual_seed(0)
    model = FFN(bias=bias)
    x = torch.randn(tokens, 32)
    backend = PassTestBackend(DenseFP8())
    got = step(torch.compile(model, backend=backend), model, x)
    expected = step(lambda t: reference(model, t), model, x)
    dense = step(model, model, x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(got[0], dense[0], atol=1e-4)  # quantized, not the dense numbers
    # Six matmuls in, six FP8 products out, no mm/addmm left.
    assert backend.op_count(fvc.fp8_scaled_mm.default, pass_name="fp8_dense") == 6
    assert backend.op_count(aten.mm.default, pass_name="fp8_dense") == 0
    assert backend.op_count(aten.addmm.default, pass_name="fp8_dense") == 0
    sites = backend.sites("fp8_dense")
    assert len(sites) == 6 and {s.kind for s in sites} == {"matmul"}
    assert all(s.ops[str(fvc.fp8_scaled_mm.default)] == 1 for s in sites)


def test_inference_graph_and_dynamic_token_counts():
    """Under no_grad the forward matmuls only; a dynamic token count is K of no forward matmul."""
    torch.manual_seed(1)
    model = FFN()
    backend = PassTestBackend(DenseFP8())
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for tokens in (16, 23):
            x = torch.randn(tokens, 32)
            torch.testing.assert_close(compiled(x), reference(model, x), atol=1e-4, rtol=1e-3)
    assert all(r.graph_kind == "inference" for r in backend.runs("fp8_dense"))
    assert len(backend.sites("fp8_dense")) == 2 * len(backend.runs("fp8_dense"))


def test_module_filter_and_registration():
    """The module filter holds for the backward matmuls too: they belong to the forward's module."""
    torch.manual_seed(2)
    model = FFN()
    optimized = fvcompile.optimize(model, passes=[DenseFP8()], codegen=False, exclude=("w2",))
    optimized(torch.randn(8, 32, requires_grad=True)).sum().backward()
    runs = optimized.fvcompile_report.pass_runs("fp8_dense")
    rewritten = [s for r in runs for s in r.result.rewritten]
    skipped = [s for r in runs for s in r.result.skipped]
    assert sorted(s.module for s in rewritten) == ["w1"] * 3  # h = X W1ᵀ, dX, dW1
    assert [(s.module, s.reason) for s in skipped] == [("w2", "excluded")] * 3  # Y, dA, dW2
    assert pass_class("fp8_dense") is DenseFP8 and not DenseFP8.exact and DenseFP8.hook == "joint"
