"""The sparse24 pass on joint graphs (fvcompile.optimize(codegen=False): AOTAutograd, no codegen).

The reference for every rewritten FFN is a plain-PyTorch masked FFN,
`W2 · (mask ⊙ relu(W1 x))²` with the mask a constant of the input, differentiated by autograd:
the compiled forward AND backward must equal it (not dense eager, which they must not equal).
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from fp8_reference import Fp8DenseLinear
from torch import nn
from torch._inductor.utils import fresh_cache

import fvcompile
from fvcompile.kernels import sparse24 as k24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels.sparse24_cslt import strided_order
from fvcompile.kernels.sparse24_fp8 import fp8_mm_reference, fp8_rowwise_mm
from fvcompile.models import get
from fvcompile.passes.base import PassContext
from fvcompile.passes.sparse24 import Sparse24
from fvcompile.passes.sparse24_config import RECIPES, Sparse24Config
from fvcompile.testing import PassTestBackend

FORMS = ["relu_pow", "square", "method_pow", "relu_module_square", "mul", "cast",
         "relu_inplace", "relu_module_inplace", "twin_relus", "clamp", "einsum"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class SquaredReluFFN(nn.Module):
    """W2 · relu(W1 x)², written in one of the ways people write it."""

    def __init__(self, dim=32, hidden=128, form="relu_pow", bias=False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.act = nn.ReLU(inplace=form == "relu_module_inplace")
        self.form = form

    def forward(self, x):
        h = self.linear(self.w1, x)
        if self.form in ("relu_pow", "einsum"):
            a = F.relu(h) ** 2
        elif self.form == "square":
            a = torch.square(F.relu(h))
        elif self.form == "method_pow":
            a = h.relu().pow(2)
        elif self.form in ("relu_module_square", "relu_module_inplace"):
            a = self.act(h).square()
        elif self.form == "relu_inplace":  # reaches the graph as relu, then views
            a = F.relu(h, inplace=True) ** 2
        elif self.form == "twin_relus":  # two relu nodes of one input
            a = torch.relu(h) * torch.relu(h)
        elif self.form == "clamp":  # clamp_min(h, 0): relu by another name, its gradient reads h
            a = torch.clamp(h, min=0).pow(2)
        elif self.form == "mul":
            r = F.relu(h)
            a = r * r
        elif self.form == "cast":  # what autocast does: the square in fp32, the matmul in low precision
            a = F.relu(h).float().pow(2).to(h.dtype)
        return self.linear(self.w2, a)

    def linear(self, layer, x):
        if self.form != "einsum":
            return layer(x)
        # A bmm of batch 1 in the graph, between unsqueezes and permutes of size-1 dims.
        y = torch.einsum("...i,oi->...o", x, layer.weight)
        return y if layer.bias is None else y + layer.bias


def masked_relu(h):
    r = F.relu(h)
    return r * k24.mask24(r.detach())


def reference(model: SquaredReluFFN, x):
    """The sparse FFN in plain PyTorch (autograd gives the reference backward)."""
    return model.w2(masked_relu(model.w1(x)).float().pow(2).to(x.dtype))


def run_step(fn, model, x, grad_out):
    """Forward and backward; returns the output and every gradient (x and parameters)."""
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (y.float() * grad_out).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return y.detach(), grads


def assert_step_close(got, expected, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(got[0], expected[0], atol=atol, rtol=rtol)
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], atol=atol, rtol=rtol, msg=name)


def sites(optimized, kind="rewritten"):
    return [s for r in optimized.fvcompile_report.pass_runs("sparse24") for s in getattr(r.result, kind)]


# Op names as a site's `ops` and the report's op counts name them.
fvc = torch.ops.fvcompile
RELU24, RELU24_MAX = str(fvc.sparse24_relu.default), str(fvc.sparse24_relu_max.default)
MM24, WGRAD24, FP8_MM = (str(fvc.sparse24_mm.default), str(fvc.sparse24_weight_grad_mm.default),
                         str(fvc.fp8_scaled_mm.default))


# ---- every form is rewritten and equals the masked reference forward and backward -------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tokens_3d", [False, True])
def test_every_form_matches_the_reference(form, tokens_3d):
    torch.manual_seed(0)
    model = SquaredReluFFN(form=form, bias=form == "mul")
    x = torch.randn(2, 9, 32) if tokens_3d else torch.randn(18, 32)
    grad_out = torch.randn(*x.shape)
    optimized = fvcompile.optimize(model, passes=[Sparse24()], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    expected = run_step(lambda t: reference(model, t), model, x, grad_out)
    dense = run_step(model, model, x, grad_out)
    assert_step_close(got, expected)
    assert not torch.allclose(got[0], dense[0], atol=1e-3)  # the rewrite changed the numbers
    (site,) = sites(optimized)
    # Emulated: only the relu is replaced, the matmuls stay dense on the 2:4 tensors.
    assert site.kind == "relu2_ffn" and site.ops[RELU24] == 1 and MM24 not in site.ops
    assert any("emulated: cpu has no 2:4 sparse tensor cores" in n
               for r in optimized.fvcompile_report.pass_runs("sparse24") for n in r.result.notes)


@pytest.mark.parametrize("form", ["relu_pow", "mul", "cast", "relu_inplace", "twin_relus", "clamp", "einsum"])
def test_sparse_matmul_rewrite_forward_and_dx(form):
    """sparse_mm=True: the forward mm/addmm and the backward dX mm become sparse24_mm (emulated on CPU)."""
    torch.manual_seed(1)
    model = SquaredReluFFN(form=form, bias=True)
    x, grad_out = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference(model, t), model, x, grad_out))
    (site,) = sites(optimized)
    assert site.ops[MM24] == 2  # the forward matmul and dX
    # r² is never written: the matmul reads the sparse relu r and squares it as it packs (how the
    # op reads its operand is no op count: the report's words say it).
    assert "(reads r, squares as it packs)" in site.detail


class Fp8SecondLinear(torch.autograd.Function):
    """y = r² W2ᵀ as the FP8 2:4 formula of kernels/sparse24_fp8.py; its gradients (dA, dW2) dense
    FP8 matmuls with row-wise scales; straight through the quantization."""

    @staticmethod
    def forward(ctx, r, w2):
        ctx.save_for_backward(r, w2)
        return fp8_mm_reference(r, w2.t(), select=False, square=True)

    @staticmethod
    def backward(ctx, grad):
        r, w2 = ctx.saved_tensors
        return fp8_rowwise_mm(grad, w2, r.dtype) * 2 * r, fp8_rowwise_mm(grad.t(), r * r, r.dtype)


class Fp8FirstLinear(Fp8DenseLinear):
    """h = x W1ᵀ and dW1 as above; dX = dH W1 as the FP8 2:4 formula (dH is 2:4 already)."""

    @staticmethod
    def backward(ctx, grad):
        x, w1 = ctx.saved_tensors
        return fp8_mm_reference(grad, w1, select=False), fp8_rowwise_mm(grad.t(), x, x.dtype)


def reference_dense_fp8(model: SquaredReluFFN, x):
    x2d = x.reshape(-1, x.shape[-1])
    r = torch.relu(Fp8DenseLinear.apply(x2d, model.w1.weight))
    return Fp8DenseLinear.apply(r * r, model.w2.weight).reshape(*x.shape[:-1], -1)


def reference_fp8(model: SquaredReluFFN, x):
    x2d = x.reshape(-1, x.shape[-1])
    r = masked_relu(Fp8FirstLinear.apply(x2d, model.w1.weight))
    return Fp8SecondLinear.apply(r, model.w2.weight).reshape(*x.shape[:-1], -1)


def test_fp8_matmuls_forward_and_dx():
    """Sparse24(fp8=True): the forward matmul and dX run the FP8 2:4 formula (emulated on CPU),
    the other four matmuls dense FP8 with row-wise scales."""
    torch.manual_seed(3)
    model = SquaredReluFFN(hidden=256)
    x, grad_out = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(fp8=True)], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference_fp8(model, t), model, x, grad_out))
    exact = run_step(lambda t: reference(model, t), model, x, grad_out)
    assert not torch.allclose(got[0], exact[0], atol=1e-3)  # quantized: not the bf16/fp32 sparse FFN
    for g, e in [(got[0], exact[0]), *((got[1][n], exact[1][n]) for n in exact[1])]:  # but close to it
        assert ((g - e).norm() / e.norm()).item() < 0.08
    (site,) = sites(optimized)
    # All six FFN matmuls in FP8: two 2:4 sparse, four dense with row-wise scales, none left.
    assert site.ops[MM24] == 2 and site.ops[FP8_MM] == 4 and site.ops[RELU24_MAX] == 1
    assert str(torch.ops.aten.mm.default) not in [op for op, n in site.ops.items() if n > 0]
    assert any("cpu has no 2:4 sparse tensor cores" in n for r in optimized.fvcompile_report.pass_runs()
               for n in r.result.notes)


def token_sparse(m):
    """m (T, H) with, per feature, the 2 largest of every 4 tokens kept, the tokens padded with
    zeros to a multiple of 64 and grouped strided (t, t + T/4, t + T/2, t + 3T/4: `strided_order`)."""
    t = m.shape[0]
    t_pad = -(-t // 64) * 64
    order = strided_order(t_pad)
    padded = torch.nn.functional.pad(m, (0, 0, 0, t_pad - t))
    kept = torch.zeros_like(padded)
    kept[order] = k24.sparse24_mask_reference(padded[order].t()).t()
    return kept[:t]


class TokenSparseLinear(torch.autograd.Function):
    """y = a @ wᵀ whose weight gradient keeps only the 2 largest of every 4 tokens of a (`token_sparse`)."""

    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return a @ w.t()

    @staticmethod
    def backward(ctx, grad):
        a, w = ctx.saved_tensors
        return grad @ w, grad.t() @ token_sparse(a)


def reference_token_sparse_weight_grad(model: SquaredReluFFN, x):
    a = masked_relu(model.w1(x)).pow(2)
    a2d = a.reshape(-1, a.shape[-1])
    y = TokenSparseLinear.apply(a2d, model.w2.weight)
    return y.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("tokens", [128, 98])  # 98: padded with zero tokens to 128
@pytest.mark.parametrize("sparse_mm", [None, True])
def test_sparse_weight_grad_selects_along_tokens(tokens, sparse_mm):
    torch.manual_seed(2)
    model = SquaredReluFFN()
    x, grad_out = torch.randn(2, tokens // 2, 32), torch.randn(2, tokens // 2, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad=True, sparse_mm=sparse_mm)],
                                   codegen=False)
    got = run_step(optimized, model, x, grad_out)
    expected = run_step(lambda t: reference_token_sparse_weight_grad(model, t), model, x, grad_out)
    exact = run_step(lambda t: reference(model, t), model, x, grad_out)
    assert_step_close(got, expected)
    # Only dW2 is approximated: the output and the other gradients stay exact.
    assert not torch.allclose(got[1]["w2.weight"], exact[1]["w2.weight"], atol=1e-4)
    for name in ("x", "w1.weight"):
        torch.testing.assert_close(got[1][name], exact[1][name], atol=1e-5, rtol=1e-4)
    (site,) = sites(optimized)
    assert site.ops[WGRAD24] == 1  # dW2
    assert "dW2 matmul -> sparse24_weight_grad_mm (2:4 along tokens, reads r)" in site.detail  # how: reads r


def test_op_counts_before_and_after_the_pass():
    """What the pass changed, counted in the graph before and after it (fvcompile.testing), and
    the same count on the site it reports."""
    torch.manual_seed(2)
    model = SquaredReluFFN(bias=True)
    backend = PassTestBackend(Sparse24(sparse_mm=True, sparse_weight_grad="all"))
    x = torch.randn(2, 32, 32, requires_grad=True)  # its gradient is dX
    torch.compile(model, backend=backend)(x).sum().backward()
    aten = torch.ops.aten
    assert (backend.op_count(aten.relu.default, before=True), backend.op_count(aten.relu.default)) == (1, 0)
    assert backend.op_count(fvc.sparse24_relu.default) == 1
    assert backend.op_count(fvc.sparse24_mm.default) == 2  # forward and dX
    assert backend.op_count(fvc.sparse24_weight_grad_mm.default) == 2  # dW2 and dW1
    dense = [aten.mm.default, aten.addmm.default]
    assert sum(backend.op_count(op, before=True) - backend.op_count(op) for op in dense) == 4
    (site,) = backend.sites("sparse24")
    assert site.ops == backend.runs("sparse24")[0].op_delta()


def test_sparse_weight_grad_leaves_inference_alone():
    model = SquaredReluFFN()
    x = torch.randn(12, 32)
    with torch.no_grad():
        out = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad=True)], codegen=False)(x)
        torch.testing.assert_close(out, reference(model, x))


def test_low_precision_with_casts():
    torch.manual_seed(2)
    model = SquaredReluFFN(form="cast").to(torch.bfloat16)
    x = torch.randn(16, 32).to(torch.bfloat16)
    grad_out = torch.randn(16, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference(model, t), model, x, grad_out), atol=2e-2, rtol=2e-2)
    assert len(sites(optimized)) == 1


@pytest.mark.parametrize("form", ["relu_pow", "einsum"])
def test_inference_graph_and_dynamic_token_counts(form):
    torch.manual_seed(3)
    model = SquaredReluFFN(form=form)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False, dynamic=True)
    with torch.no_grad():
        for tokens in (10, 37, 64):  # off and on the kernels' 32-row alignment
            x = torch.randn(2, tokens, 32)
            torch.testing.assert_close(optimized(x), reference(model, x), atol=1e-5, rtol=1e-4)
    report = optimized.fvcompile_report
    assert len(report.graphs) == 1 and report.pass_runs("sparse24")[0].graph_kind == "inference"
    # Nothing else needs the sparse relu: the matmul reads h and does relu, 2:4, square and pack.
    (site,) = sites(optimized)
    # The sparse relu went: the matmul reads h and does relu, 2:4, square and pack itself.
    assert site.ops[MM24] == 1 and RELU24 not in site.ops and site.ops[str(torch.ops.aten.relu.default)] == -1


# ---- what must not match ----------------------------------------------------------------------

class RMSNormSwiGLU(nn.Module):
    def __init__(self, dim=32, hidden=128):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        xf = x.float()
        x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)  # hand-written RMSNorm: pow(x, 2)
        return self.down(F.silu(self.gate(x)) * self.up(self.norm(x)))


class GeluMLP(nn.Module):
    def __init__(self, dim=32, hidden=128):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate="tanh"))


@pytest.mark.parametrize("model_cls", [RMSNormSwiGLU, GeluMLP])
def test_other_ffns_and_rmsnorm_untouched(model_cls):
    torch.manual_seed(4)
    model = model_cls()
    x, grad_out = torch.randn(8, 32), torch.randn(8, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False)
    assert_step_close(run_step(optimized, model, x, grad_out), run_step(model, model, x, grad_out))
    assert sites(optimized) == []
    if model_cls is RMSNormSwiGLU:
        assert sites(optimized, "skipped") and all(
            (s.kind, s.reason) == ("square", "not_of_relu") for s in sites(optimized, "skipped"))


class Relu2Variant(nn.Module):
    def __init__(self, kind, hidden=128):
        super().__init__()
        self.kind = kind
        self.w1, self.w2 = nn.Linear(32, hidden, bias=False), nn.Linear(hidden, 32, bias=False)

    def forward(self, x):
        r = F.relu(self.w1(x))
        if self.kind == "plain_relu":
            return self.w2(r)
        if self.kind == "not_a_matmul":
            return (r ** 2).sum(-1)
        if self.kind == "relu_reused":
            return self.w2(r ** 2) + r.sum(-1, keepdim=True)
        if self.kind == "reshaped":  # rows of 64 of the hidden units, not of the tokens
            return (r ** 2).reshape(-1, 64) @ self.w2.weight[:, :64].t()
        return self.w2(r ** 2)


@pytest.mark.parametrize("kind, hidden, site_kind, reason", [
    ("plain_relu", 128, "relu", "not_squared"),
    ("not_a_matmul", 128, "relu2_ffn", "not_a_matmul"),
    ("relu_reused", 128, "relu2_ffn", "extra_use"),
    ("reshaped", 128, "relu2_ffn", "not_hidden_reduction"),
    ("aligned", 30, "relu2_ffn", "hidden_not_aligned"),
    ("aligned", 96, "relu2_ffn", "hidden_not_aligned"),
])
def test_near_misses_are_skipped_with_the_reason(kind, hidden, site_kind, reason):
    torch.manual_seed(5)
    model = Relu2Variant(kind, hidden)
    x, grad_out = torch.randn(8, 32), torch.randn(*model(torch.randn(8, 32)).shape)
    optimized = fvcompile.optimize(model, passes=[Sparse24()], codegen=False)
    assert_step_close(run_step(optimized, model, x, grad_out), run_step(model, model, x, grad_out))
    assert sites(optimized) == []
    (skipped,) = sites(optimized, "skipped")
    assert (skipped.kind, skipped.reason) == (site_kind, reason) and not skipped.ops


# ---- options: emulate, module filter, warm-up, uuid -------------------------------------------

def test_emulate_false_leaves_cpu_sites_dense():
    torch.manual_seed(6)
    model = SquaredReluFFN()
    x, grad_out = torch.randn(8, 32), torch.randn(8, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(emulate=False)], codegen=False)
    assert_step_close(run_step(optimized, model, x, grad_out), run_step(model, model, x, grad_out))
    (skipped,) = sites(optimized, "skipped")
    assert (skipped.kind, skipped.reason) == ("relu2_ffn", "no_sparse_mm")
    assert sites(optimized) == []


@pytest.mark.parametrize("include, exclude, expected", [
    ((), (), {"layers.0.feed_forward", "layers.1.feed_forward"}),
    (("layers.0",), (), {"layers.0.feed_forward"}),
    ((), ("layers.0.*",), {"layers.1.feed_forward"}),
])
def test_llama_relu2_sites_and_module_filter(include, exclude, expected):
    spec = get("llama-tiny-relu2")
    torch.manual_seed(7)
    model = spec.build()
    optimized = fvcompile.optimize(model, passes=["sparse24"], codegen=False, fullgraph=True,
                                   include=include, exclude=exclude)
    with torch.no_grad():
        optimized(*spec.example_inputs(model, 2))
    assert {s.module for s in sites(optimized)} == expected
    skipped = sites(optimized, "skipped")
    excluded = {s.module for s in skipped if s.reason == "excluded"}
    assert excluded == {"layers.0.feed_forward", "layers.1.feed_forward"} - expected
    assert any(s.kind == "square" for s in skipped)  # RMSNorm's x², seen and left alone


def test_llama_relu2_training_step_matches_masked_reference():
    spec = get("llama-tiny-relu2")
    torch.manual_seed(8)
    model = spec.build()
    batch = spec.train_batch(model, 2)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False, fullgraph=True)
    loss = spec.train_step(optimized, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # Reference: the same model with each FFN's relu replaced by the masked relu, in eager.
    for layer in model.layers:
        ffn = layer.feed_forward
        ffn.forward = lambda x, ffn=ffn: ffn.w2(masked_relu(ffn.w1(x)) ** 2)
    ref_loss = spec.train_step(model, batch)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert len(sites(optimized)) == 2


@pytest.mark.parametrize("sparse_mm", [None, True])
def test_dense_warmup_then_sparse(sparse_mm):
    torch.manual_seed(9)
    model = SquaredReluFFN(bias=True)
    x, grad_out = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    p = Sparse24(warmup_steps=2, sparse_mm=sparse_mm)
    optimized = fvcompile.optimize(model, passes=[p], codegen=False)
    dense = run_step(model, model, x, grad_out)
    sparse = run_step(lambda t: reference(model, t), model, x, grad_out)
    assert_step_close(run_step(optimized, model, x, grad_out), dense)  # step 0
    assert_step_close(run_step(optimized, model, x, grad_out), dense)  # step 1
    assert_step_close(run_step(optimized, model, x, grad_out), sparse)  # step 2
    assert_step_close(run_step(optimized, model, x, grad_out), sparse)  # step 3
    (site,) = sites(optimized)
    # One count per training step, none in the backward; a site is module#index (a top-level
    # module has no path: its relu node's name).
    assert p.schedule.counters() == {f"{site.node}#0": 4}
    assert any("dense warm-up" in n for r in optimized.fvcompile_report.pass_runs() for n in r.result.notes)


class CheckpointedFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = SquaredReluFFN(hidden=256)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.ffn, x, use_reentrant=False)


@pytest.mark.parametrize("codegen, fp8", [(False, False), (False, True), (True, False)])
def test_dense_warmup_under_activation_checkpointing(codegen, fp8):
    """Activation checkpointing recomputes the FFN in the backward; the op counting the warm-up's
    steps is saved instead, so each step counts once and its backward runs as its forward did."""
    torch.manual_seed(10)
    model = CheckpointedFFN()
    x, grad_out = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    p = Sparse24(warmup_steps=2, sparse_mm=True, fp8=fp8)
    optimized = fvcompile.optimize(model, passes=[p], codegen=codegen)
    # FP8 is not warmed up: the warm-up runs the FFN dense in FP8
    dense_ref, sparse_ref = (reference_dense_fp8, reference_fp8) if fp8 else (lambda m, t: m(t), reference)
    expected = [run_step(lambda t: dense_ref(model.ffn, t), model, x, grad_out)] * 2 + [
        run_step(lambda t: sparse_ref(model.ffn, t), model, x, grad_out)]
    with fresh_cache():  # a cached graph would run no pass
        for want in expected:  # steps 0 and 1 dense, step 2 sparse
            assert_step_close(run_step(optimized, model, x, grad_out), want, atol=1e-4, rtol=1e-3)
    assert p.schedule.steps_counted("ffn#0") == 3


def test_dense_warmup_under_cuda_graphs_is_an_error():
    """A CUDA graph replay skips the host code where the warm-up counts its steps: say so."""
    gm = torch.fx.symbolic_trace(SquaredReluFFN())
    cuda_joint = PassContext(graph_kind="joint", device=torch.device("cuda"))
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        with pytest.raises(ValueError, match="cannot run under CUDA graphs.*warmup_steps=0"):
            Sparse24(warmup_steps=2).run(gm, cuda_joint)
        # On the CPU, where Inductor makes no CUDA graphs, the warm-up runs as it does elsewhere.
        Sparse24(warmup_steps=2).run(gm, PassContext(graph_kind="joint", device=torch.device("cpu")))  # no error


def test_options_feed_the_uuid():
    assert Sparse24().uuid() == Sparse24().uuid()
    assert Sparse24().uuid() != Sparse24(emulate=False).uuid()
    assert Sparse24().uuid() != Sparse24(sparse_mm=True).uuid()
    # Each warm-up schedule is its own: a second one must not reuse the first one's cached graph.
    assert Sparse24(warmup_steps=2).uuid() != Sparse24(warmup_steps=2).uuid()
    assert not Sparse24.exact and Sparse24.hook == "joint"
    assert not Sparse24().pays_off_on(torch.device("cpu"))


def test_options_form_one_frozen_validated_config_with_recipes():
    config = Sparse24(sparse_weight_grad=True, fp8=True).config
    assert config == Sparse24Config(sparse_weight_grad="dW2", fp8=True) == RECIPES["paper"]
    assert Sparse24(recipe="paper").options() == Sparse24(config).options()
    assert Sparse24(recipe="fastest", warmup_steps=3).config == RECIPES["fastest"].replace(warmup_steps=3)
    assert config.sparse_dw2 and not config.sparse_dw1 and RECIPES["fastest"].sparse_dw1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fp8 = False
    for bad in ({"sparse_weight_grad": "dW1"}, {"warmup_steps": -1}, {"fp8": "yes"}, {"sparse_mm": 1.5}):
        with pytest.raises(ValueError):
            Sparse24(**bad)
    with pytest.raises(ValueError, match="unknown sparse24 recipe"):
        Sparse24(recipe="fast")
    with pytest.raises(TypeError):
        Sparse24(sparsity=0.5)  # no such option
    with pytest.raises(TypeError, match="by keyword"):
        Sparse24(False)  # emulate=False, by position as it once was


def test_a_site_is_rewritten_by_the_steps_its_config_asks_for():
    from fvcompile.passes import sparse24_steps as st

    relu, dw2, dw1, fwd, dx, fp8 = (st.sparse_relu, st.sparse_dw2, st.sparse_dw1, st.sparse_forward, st.sparse_dx,
                                    st.dense_fp8)
    assert st.steps_for(RECIPES["exact"], training=True, use_mm=True) == [relu, fwd, dx]
    assert st.steps_for(RECIPES["exact"], training=True, use_mm=False) == [relu]  # emulated: matmuls dense
    assert st.steps_for(RECIPES["paper"], training=True, use_mm=True) == [relu, dw2, fwd, dx, fp8]
    assert st.steps_for(RECIPES["fastest"], training=True, use_mm=True) == [relu, dw2, dw1, fwd, dx, fp8]
    assert st.steps_for(RECIPES["fastest"], training=False, use_mm=True) == [relu, fwd, fp8]  # no backward


def test_the_uuid_covers_the_helper_modules(monkeypatch):
    with_helpers = Sparse24().uuid()
    monkeypatch.setattr(Sparse24, "helpers", ())
    assert Sparse24().uuid() != with_helpers  # passes/bmm_as_mm.py's source is part of it


# ---- real Inductor, and the GPU path ----------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and backends.sparse_tensor_cores_available("cuda") else [])


@pytest.mark.inductor
@pytest.mark.parametrize("device", DEVICES)
def test_real_inductor_compile(device):
    torch.manual_seed(10)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = SquaredReluFFN(hidden=128, bias=True).to(device, dtype)
    x = torch.randn(2, 40, 32, device=device, dtype=dtype)
    grad_out = torch.randn(2, 40, 32, device=device)
    optimized = fvcompile.optimize(model, passes=[Sparse24()])
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-4)
    with fresh_cache():  # a cached graph would run no pass
        got = run_step(optimized, model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference(model, t), model, x, grad_out), **tol)
    (site,) = sites(optimized)
    assert site.ops.get(MM24, 0) == (2 if device == "cuda" else 0)  # forward and dX on sparse cores


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU with 2:4 sparse tensor cores")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sparse_tensor_core_path(dtype):
    torch.manual_seed(11)
    model = SquaredReluFFN(dim=64, hidden=256, form="cast").to("cuda", dtype)
    x = torch.randn(3, 50, 64, device="cuda", dtype=dtype)
    grad_out = torch.randn(3, 50, 64, device="cuda")
    optimized = fvcompile.optimize(model, passes=[Sparse24()], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference(model, t), model, x, grad_out), atol=5e-2, rtol=5e-2)
    (site,) = sites(optimized)
    assert site.ops[MM24] == 2 and "emulated" not in site.detail


class AllSparseWeightGrads(torch.autograd.Function):
    """The sparse FFN with both weight gradients token-wise 2:4 (tokens grouped strided), dW1's 5%
    densest features kept whole: Sparse24(sparse_weight_grad="all")'s reference."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        r = masked_relu(x @ w1.t())
        ctx.save_for_backward(x, w1, w2, r)
        return (r * r) @ w2.t()

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, r = ctx.saved_tensors
        d_h = (dy @ w2) * 2 * r
        d_h_kept = token_sparse(d_h)
        densest = (d_h != 0).sum(0).topk(math.ceil(0.05 * d_h.shape[1])).indices
        d_h_kept[:, densest] = d_h[:, densest]
        return d_h @ w1, d_h_kept.t() @ x, dy.t() @ token_sparse(r * r)


@pytest.mark.parametrize("sparse_mm", [None, True])
def test_all_weight_grads_sparse(sparse_mm):
    torch.manual_seed(4)
    model = SquaredReluFFN(hidden=256)
    x, grad_out = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad="all", sparse_mm=sparse_mm)],
                                   codegen=False)
    got = run_step(optimized, model, x, grad_out)

    def ref(t):
        return AllSparseWeightGrads.apply(t.reshape(-1, 32), model.w1.weight, model.w2.weight).reshape(t.shape)

    assert_step_close(got, run_step(ref, model, x, grad_out))
    exact = run_step(lambda t: reference(model, t), model, x, grad_out)
    for name in ("w1.weight", "w2.weight"):  # both approximated; the rest exact
        assert not torch.allclose(got[1][name], exact[1][name], atol=1e-4)
    torch.testing.assert_close(got[1]["x"], exact[1]["x"], atol=1e-5, rtol=1e-4)
    (site,) = sites(optimized)
    assert site.ops[WGRAD24] == 2  # dW1 and dW2
    assert site.ops.get(MM24, 0) == (2 if sparse_mm else 0)  # forward and dX, where asked for on CPU
    with pytest.raises(ValueError, match="sparse_weight_grad must be"):
        Sparse24(sparse_weight_grad="dW1")


class DropoutFFN(nn.Module):
    """T5's (and Primer's) FFN: dropout between the activation and the second linear."""

    def __init__(self, p=0.25, gated=False, einsum=False):
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Linear(32, 256, bias=False), nn.Linear(256, 32, bias=False),
                                     nn.Linear(32, 256, bias=False))
        self.p, self.gated, self.einsum = p, gated, einsum

    def forward(self, x):
        a = F.relu(self.w1(x)) ** 2
        if self.gated:  # relu²-GLU: the gate is an activation, not the graph's own randomness
            a = a * self.w3(x)
        a = F.dropout(a, self.p, self.training)
        return torch.einsum("btf,df->btd", a, self.w2.weight) if self.einsum else self.w2(a)


def dropout_reference(model, x):
    """The sparse FFN with dropout's mask drawn as the compiled graph draws it (`rand` > p)."""
    a = masked_relu(model.w1(x)) ** 2
    keep = torch.rand(a.shape) > model.p
    return model.w2(keep * a * (1 / (1 - model.p)))


@pytest.mark.parametrize("sparse_weight_grad, einsum", [(False, False), ("all", False), (False, True)])
def test_dropout_between_relu2_and_the_matmul_keeps_the_site(sparse_weight_grad, einsum, monkeypatch):
    """Dropout only zeros more entries: its output is still 2:4, so the matmul after it is sparse
    (forward and dX; with "all" the weight gradients too), reading the dropped-out activation."""
    torch.manual_seed(9)
    model = DropoutFFN(einsum=einsum)
    x, grad_out = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    # The graph's rand left as it is, drawing what eager's draws (Inductor's own random ops would not).
    monkeypatch.setattr(torch._inductor.fx_passes.joint_graph, "replace_random_passes", lambda gm: 0)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True, sparse_weight_grad=sparse_weight_grad)],
                                   codegen=False)
    torch.manual_seed(10)  # the compiled graph's one rand call draws what the reference's does
    got = run_step(optimized, model, x, grad_out)
    torch.manual_seed(10)
    expected = run_step(lambda t: dropout_reference(model, t), model, x, grad_out)
    (site,) = sites(optimized)
    assert site.ops[MM24] == 2  # forward and dX
    if sparse_weight_grad:
        assert site.ops[WGRAD24] == 2  # dW2 and dW1
    else:
        assert_step_close(got, expected)


def test_dropout_of_zero_in_training_keeps_the_site():
    """Dropout(p=0.0) in training leaves a clone between relu² and the matmul: the same values,
    so the site is rewritten as with p > 0 (issue #16: it was skipped as 'not a matmul')."""
    torch.manual_seed(9)
    model = DropoutFFN(p=0.0)
    x, grad_out = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_mm=True)], codegen=False)
    got = run_step(optimized, model, x, grad_out)
    expected = run_step(lambda t: model.w2(masked_relu(model.w1(t)) ** 2), model, x, grad_out)
    (site,) = sites(optimized)
    assert site.ops[MM24] == 2 and not sites(optimized, "skipped")
    assert_step_close(got, expected)


def test_a_gate_between_relu2_and_the_matmul_is_no_site():
    model = DropoutFFN(gated=True)
    optimized = fvcompile.optimize(model, passes=[Sparse24()], codegen=False)
    optimized(torch.randn(4, 32))
    assert sites(optimized) == []
    (skipped,) = sites(optimized, "skipped")
    assert (skipped.kind, skipped.reason) == ("relu2_ffn", "not_a_matmul")


class RoutedExperts(nn.Module):
    """A top-1 mixture of Squared-ReLU experts, as MoE code loops over them (Nemotron-style relu²
    experts): each expert gets the tokens routed to it, a count known only at run time."""

    def __init__(self, dim=32, hidden=64, experts=3):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(SquaredReluFFN(dim, hidden) for _ in range(experts))

    def forward(self, x, ffn=None):
        weight, index = self.router(x).softmax(-1).max(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (index == e).nonzero().squeeze(-1)
            y = (ffn or (lambda m, t: m(t)))(expert, x[rows])
            out = out.index_add(0, rows, y * weight[rows, None])
        return out


@pytest.mark.parametrize("capture_dynamic_output_shapes", [False, True])
def test_routed_experts_with_data_dependent_token_counts(capture_dynamic_output_shapes):
    """Each expert's FFN is a site, whether Dynamo breaks the graph at the routing (the default) or
    captures it with unbacked token counts (`capture_dynamic_output_shape_ops`)."""
    torch.manual_seed(12)
    model = RoutedExperts()
    x, grad_out = torch.randn(40, 32), torch.randn(40, 32)
    optimized = fvcompile.optimize(model, passes=[Sparse24()], codegen=False)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture_dynamic_output_shapes):
        got = run_step(optimized, model, x, grad_out)
    expected = run_step(lambda t: model(t, ffn=reference), model, x, grad_out)
    assert_step_close(got, expected)
    rewritten = sites(optimized)
    if capture_dynamic_output_shapes:  # one graph: every expert its own site
        assert sorted(s.module for s in rewritten) == ["experts.0", "experts.1", "experts.2"]
    else:  # a graph per expert call, one compiled FFN shared by the experts (their weights are inputs)
        assert rewritten and all(s.kind == "relu2_ffn" and s.ops[RELU24] == 1 for s in rewritten)


def _all_sparse_step(model, x, grad_out):
    """One step of `model` under Sparse24(sparse_weight_grad="all", sparse_mm=True): the step, and
    the fvcompile ops of its one site."""
    torch._dynamo.reset()
    optimized = fvcompile.optimize(model, passes=[Sparse24(sparse_weight_grad="all", sparse_mm=True)],
                                   codegen=False)
    step = run_step(optimized, model, x, grad_out)
    return step, {op: n for op, n in sites(optimized)[0].ops.items() if op.startswith("fvcompile.")}


@pytest.fixture(scope="module")
def plain_all_sparse_step():
    """The plain form's model, inputs and step, compiled once for every spelling compared with it."""
    torch.manual_seed(6)
    plain = SquaredReluFFN(hidden=256, bias=True)
    x, grad_out = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    return plain.state_dict(), x, grad_out, _all_sparse_step(plain, x, grad_out)


@pytest.mark.parametrize("form", ["relu_inplace", "relu_module_inplace", "twin_relus", "clamp", "einsum"])
def test_other_spellings_rewrite_every_matmul_the_plain_form_does(form, plain_all_sparse_step):
    """In-place relus (whose gradient reads views, and with a bias copies), twin relus (whose
    gradients are summed), clamp(min=0) (whose gradient reads h) and einsum linears (bmms of batch
    1, whose weight gradients come transposed): forward, dX, dW2 and dW1 all become sparse24_mm as
    for `F.relu(h) ** 2`, with the same numbers."""
    plain_state, x, grad_out, (plain_step, plain_ops) = plain_all_sparse_step
    other = SquaredReluFFN(hidden=256, bias=True, form=form)
    other.load_state_dict(plain_state)
    step, ops = _all_sparse_step(other, x, grad_out)
    assert ops == plain_ops == {RELU24: 1, MM24: 2, WGRAD24: 2}  # forward, dX, dW2 and dW1
    assert_step_close(step, plain_step)


def test_fp8_with_dynamic_and_unaligned_token_counts():
    """Dynamic tokens: the weight gradients' K is the token count, unknown, so those two stay in the
    model's dtype (reported, with the reason); h's linear and dA, whose K and N are the model's
    widths, are FP8: the output and dX are the FP8 reference's at every token count. A static
    count off the 16s is padded: all four in FP8."""
    torch.manual_seed(4)
    model = SquaredReluFFN(hidden=256)
    optimized = fvcompile.optimize(model, passes=[Sparse24(fp8=True)], dynamic=True, codegen=False)
    for tokens in (24, 17):
        x, grad_out = torch.randn(2, tokens, 32), torch.randn(2, tokens, 32)
        got = run_step(optimized, model, x, grad_out)
        expected = run_step(lambda t: reference_fp8(model, t), model, x, grad_out)
        assert_step_close(got, (expected[0], {"x": expected[1]["x"]}))  # the weight gradients: bf16 here
    (site,) = sites(optimized)
    assert site.ops[FP8_MM] == 2  # h's linear and dA; the weight gradients' K is unknown
    assert "needs both known" in site.detail  # and the report says why
    # A static token count off the 16s (2 x 17): K padded, all four dense matmuls in FP8.
    torch._dynamo.reset()
    optimized = fvcompile.optimize(model, passes=[Sparse24(fp8=True)], codegen=False)
    x, grad_out = torch.randn(2, 17, 32), torch.randn(2, 17, 32)
    assert_step_close(run_step(optimized, model, x, grad_out),
                      run_step(lambda t: reference_fp8(model, t), model, x, grad_out))
    (site,) = sites(optimized)
    assert site.ops[FP8_MM] == 4


def test_fp8_through_inductor():
    """One real Inductor run of the FP8 rewrite (C++ on CPU): the quantizations compile around
    fvcompile.fp8_scaled_mm and the step is the FP8 reference's."""
    torch.manual_seed(3)
    model = SquaredReluFFN(hidden=256)
    x, grad_out = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    got = run_step(fvcompile.optimize(model, passes=[Sparse24(fp8=True)]), model, x, grad_out)
    assert_step_close(got, run_step(lambda t: reference_fp8(model, t), model, x, grad_out))


def test_densest_features_are_counted_in_the_graph(monkeypatch):
    """sparse_weight_grad="all": dW1's densest features come from a count of dH's nonzeros that the
    pass puts in the graph (one reduction for Inductor), not from a count inside the matmul op;
    the numbers are those of the op counting for itself."""
    from fvcompile.kernels import sparse24_weight_grad_mm as mm24

    torch.manual_seed(9)
    model = SquaredReluFFN(hidden=256)
    x, grad_out = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    plain, given = mm24.densest_rows, []

    def spy(a, fraction, counts=None):
        given.append(counts is not None)
        return plain(a, fraction, counts)

    monkeypatch.setattr(mm24, "densest_rows", spy)
    passes = [Sparse24(sparse_weight_grad="all", sparse_mm=True)]
    got = run_step(fvcompile.optimize(model, passes=passes, codegen=False), model, x, grad_out)
    assert given == [True]
    monkeypatch.setattr(mm24, "densest_rows", lambda a, fraction, counts=None: plain(a, fraction))
    torch._dynamo.reset()
    own = run_step(fvcompile.optimize(model, passes=passes, codegen=False), model, x, grad_out)
    assert torch.equal(got[0], own[0]) and all(torch.equal(got[1][n], own[1][n]) for n in own[1])


def test_fp8_scales_come_from_the_selection_pass(monkeypatch):
    """FP8 training: the forward matmul and the sparse dW2 take r's row and column maxima from
    sparse24_relu_max, dX and dW1 take dH's row and column maxima from the graph, and the numbers
    are those of scales computed inside each matmul (row_scale made to ignore them)."""
    from fvcompile.kernels import sparse24_fp8 as f8

    torch.manual_seed(8)
    model = SquaredReluFFN(hidden=256)
    x, grad_out = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    plain_row_scale, given = f8.row_scale, []

    def spy(a, square, relu, a_max=None):
        given.append(a_max is not None)
        return plain_row_scale(a, square, relu, a_max)

    monkeypatch.setattr(f8, "row_scale", spy)
    passes = [Sparse24(fp8=True, sparse_weight_grad="all")]
    optimized = fvcompile.optimize(model, passes=passes, codegen=False)
    got = run_step(optimized, model, x, grad_out)
    (site,) = sites(optimized)
    assert site.ops[RELU24_MAX] == 1
    assert given == [True] * 4  # forward, dX, dW2 and dW1: none reads its operand for its scales

    monkeypatch.setattr(f8, "row_scale", lambda a, square, relu, a_max=None: plain_row_scale(a, square, relu))
    torch._dynamo.reset()
    own = run_step(fvcompile.optimize(model, passes=passes, codegen=False), model, x, grad_out)
    assert torch.equal(got[0], own[0]) and all(torch.equal(got[1][n], own[1][n]) for n in own[1])
