"""sparse24 kernels vs their PyTorch reference (Triton interpreter on CPU, real kernels on CUDA).

Run on a machine without a GPU with TRITON_INTERPRET=1 (tests/conftest.py sets it). On a GPU
machine the same tests launch the compiled kernels on CUDA tensors, and the sparse-matmul tests
run on the sparse tensor cores when the device has them.
"""
import pytest
import torch

from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_mm as mm24
from fvcompile.kernels import sparse24_cutlass as cutlass

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 64), (37, 128), (64, 32), (100, 192)]  # token counts off the 32-row alignment included
RELU_SHAPES = SHAPES + [(5, 4), (7, 36), (3, 516)]  # selection alone needs only K % 4 == 0 (516: 2 tiles + a part)
ALL_DTYPES = [torch.float16, torch.float32, torch.bfloat16]
PACK_DTYPES = [torch.float16, torch.bfloat16]
# Selection and packing move values without arithmetic, so they are exact; matmuls are not.
MM_TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
          torch.float32: dict(atol=1e-4, rtol=1e-4)}


def randn(*shape, dtype, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def exact_square_inputs(m, k, dtype):
    """Values i/4 with |i| < 16: their squares are exact in bf16.

    The Triton interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest), so a bf16
    relu² computed in the interpreter differs from PyTorch in the last bit unless the square is exact.
    """
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    return (torch.randint(-15, 16, (m, k), generator=gen) / 4).to(dtype).to(DEVICE)


def groups(x):
    return x.reshape(*x.shape[:-1], -1, 4)


# ---- selection --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", RELU_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_relu_kernel_equals_reference(shape, dtype):
    h = randn(*shape, dtype=dtype)
    assert torch.equal(s24.sparse24_relu_triton(h), s24.sparse24_relu_reference(h))


@pytest.mark.parametrize("shape", RELU_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_relu_kernel_with_row_and_column_maxima(shape, dtype):
    """The FP8 scales' maxima, by atomic max over tiles, equal the reference's reductions."""
    h = randn(*shape, dtype=dtype)
    r, rows, cols = s24.sparse24_relu_max_triton(h)
    r_ref, rows_ref, cols_ref = s24.sparse24_relu_max_reference(h)
    assert torch.equal(r, r_ref) and torch.equal(rows, rows_ref) and torch.equal(cols, cols_ref)
    assert rows.shape == (h.numel() // shape[-1],) and cols.shape == (shape[-1],) and rows.dtype == torch.float32
    # The op: the same, its fake gives the shapes, and in a dense warm-up the maxima are of relu(h).
    assert all(torch.equal(x, y) for x, y in zip(torch.ops.fvcompile.sparse24_relu_max(h), (r, rows, cols)))
    dense = torch.ops.fvcompile.sparse24_relu_max(h, f"test-relu-max-{shape}-{dtype}", 1, True)  # step 0 of 1
    assert torch.equal(dense[0], torch.relu(h)) and torch.equal(dense[1], torch.relu(h).reshape(-1, shape[-1]).float().amax(1))


@pytest.mark.parametrize("shape", RELU_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_magnitude_select_kernel_equals_reference(shape, dtype):
    x = randn(*shape, dtype=dtype)
    assert torch.equal(s24.sparse24_select_triton(x), s24.sparse24_mask_reference(x))
    # A transposed (non-contiguous) input: the selection runs along its last dim all the same.
    xt = randn(shape[-1], 8, dtype=dtype).t()
    assert torch.equal(s24.sparse24_select_triton(xt), s24.sparse24_mask_reference(xt))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_relu_kernel_keeps_the_two_largest(dtype):
    h = randn(3, 5, 64, dtype=dtype)  # 3-D tokens
    out = s24.sparse24_relu_triton(h)
    assert out.shape == h.shape
    g_out, g_relu = groups(out), groups(torch.relu(h))
    assert ((g_out != 0).sum(-1) <= 2).all()
    kept = g_out != 0
    assert torch.equal(g_out[kept], g_relu[kept])  # kept values unchanged
    # Every kept value is at least as large as every dropped one in its group.
    smallest_kept = torch.where(kept, g_relu, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, g_relu).amax(-1)
    has_kept = kept.any(-1)
    assert (smallest_kept[has_kept] >= largest_dropped[has_kept]).all()


@pytest.mark.parametrize("shape", [(64, 128), (3, 18)])  # 18: a short last group
def test_mask24_equals_a_stable_sort(shape):
    """The reference against an independent formulation: a stable descending sort of each group."""
    for scores in (randn(*shape, dtype=torch.float32), torch.randint(-2, 3, shape).float()):  # many ties
        padded = torch.nn.functional.pad(scores.cpu(), (0, -shape[-1] % 4), value=-torch.inf)
        top2 = torch.sort(-padded.unflatten(-1, (-1, 4)), dim=-1, stable=True).indices[..., :2]
        expected = torch.zeros(padded.unflatten(-1, (-1, 4)).shape, dtype=torch.bool).scatter_(-1, top2, True)
        assert torch.equal(s24.mask24(scores).cpu(), expected.flatten(-2)[..., : shape[-1]])


def test_ties_go_to_the_lower_index():
    h = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, -1.0, 3.0, -2.0, 3.0,
                       0.0, 0.0, 0.0, 5.0]], device=DEVICE)
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 3.0, 0.0, 3.0,
                              0.0, 0.0, 0.0, 5.0]], device=DEVICE)
    assert torch.equal(s24.sparse24_relu_reference(h), expected)
    assert torch.equal(s24.sparse24_relu_triton(h), expected)
    assert s24.mask24(torch.zeros(4)).tolist() == [True, True, False, False]


# ---- ops: autograd, fake impls, compiled graphs ------------------------------------------------

def masked_relu_reference(h):
    """Plain autograd reference: relu(h) times a mask that is a constant of the input."""
    r = torch.relu(h)
    return r * s24.mask24(r.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("square", [False, True])
def test_sparse24_relu_autograd(dtype, square):
    h = randn(2, 9, 64, dtype=dtype)
    g = randn(2, 9, 64, dtype=dtype)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    y1 = torch.ops.fvcompile.sparse24_relu(h1)
    y2 = masked_relu_reference(h2)
    if square:
        y1, y2 = y1 ** 2, y2 ** 2
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(y1, y2)
    torch.testing.assert_close(h1.grad, h2.grad, **MM_TOL[dtype])


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
    out = torch.ops.fvcompile.sparse24_mm(a1, b1, select=not relu, square=square, relu=relu,
                                          transpose_out=transpose_out)
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


def test_fake_impls_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(3, 7, 128, dtype=torch.float16)  # 21 tokens: padded to 32 rows
        out = torch.ops.fvcompile.sparse24_relu(h)
        assert out.shape == h.shape and out.dtype == h.dtype
        out, rows, cols = torch.ops.fvcompile.sparse24_relu_max(h)
        assert out.shape == h.shape and rows.shape == (21,) and cols.shape == (128,) and cols.dtype == torch.float32
        for op in (torch.ops.fvcompile.relu2_sparse24_pack, torch.ops.fvcompile.sparse24_pack):
            values, meta = op(h)
            assert values.shape == (32, 64) and values.dtype == torch.float16
            assert meta.shape == (32, 8) and meta.dtype == torch.int16
        out = torch.ops.fvcompile.sparse24_mm(torch.empty(21, 128), torch.empty(128, 40))
        assert out.shape == (21, 40) and out.dtype == torch.float32


@pytest.mark.skipif(DEVICE != "cpu", reason="opcheck runs the CPU path")
def test_opcheck():
    h = torch.randn(33, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.fvcompile.sparse24_relu.default, (h,))
    torch.library.opcheck(torch.ops.fvcompile.sparse24_relu_max.default, (h,))
    a = s24.sparse24_relu_reference(torch.randn(33, 64)).requires_grad_()
    torch.library.opcheck(torch.ops.fvcompile.sparse24_mm.default, (a, torch.randn(64, 8)))
    a_max = a.detach().abs().amax(1)
    torch.library.opcheck(torch.ops.fvcompile.sparse24_mm.default, (a, torch.randn(64, 8)),
                          {"fp8": True, "select": False, "a_max": a_max})
    x16 = torch.randn(33, 64, dtype=torch.float16)
    torch.library.opcheck(torch.ops.fvcompile.relu2_sparse24_pack.default, (x16,))
    torch.library.opcheck(torch.ops.fvcompile.sparse24_pack.default, (x16,))


def test_compiled_cpu_graph_runs_the_reference():
    def ffn(x, w1, w2):
        a = torch.ops.fvcompile.sparse24_relu(x @ w1) ** 2
        return torch.ops.fvcompile.sparse24_mm(a, w2)

    x, w1, w2 = torch.randn(10, 32), torch.randn(32, 64), torch.randn(64, 16)
    compiled = torch.compile(ffn, backend="aot_eager", fullgraph=True, dynamic=True)
    expected = s24.sparse24_relu_reference(x @ w1) ** 2 @ w2
    torch.testing.assert_close(compiled(x, w1, w2), expected)
    x = torch.randn(13, 32)  # another token count, same graph
    torch.testing.assert_close(compiled(x, w1, w2), s24.sparse24_relu_reference(x @ w1) ** 2 @ w2)


def test_dense_warmup_schedule():
    h = torch.randn(4, 64)
    dense, sparse = torch.relu(h), s24.sparse24_relu_reference(h)
    key = "test-warmup-schedule"
    relu = torch.ops.fvcompile.sparse24_relu
    # Before any counted step a reader is dense; steps 0 and 1 are dense, step 2 on sparse.
    assert torch.equal(relu(h, key, 2, False), dense)
    assert torch.equal(relu(h, key, 2, True), dense)  # step 0
    assert torch.equal(relu(h, key, 2, False), dense)  # a reader in step 0
    assert torch.equal(relu(h, key, 2, True), dense)  # step 1
    assert torch.equal(relu(h, key, 2, True), sparse)  # step 2
    assert torch.equal(relu(h, key, 2, False), sparse)
    assert s24.warmup_steps_counted(key) == 3
    assert torch.equal(relu(h), sparse)  # no schedule: always sparse


# ---- devices ----------------------------------------------------------------------------------

def test_no_sparse_tensor_cores_on_cpu():
    assert not backends.sparse_tensor_cores_available("cpu")
    assert backends.sparse_mm_backend(torch.device("cpu")) is None


@pytest.mark.skipif(not (torch.cuda.is_available() and backends.sparse_tensor_cores_available("cuda")),
                    reason="needs a GPU with 2:4 sparse tensor cores")
@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("m", [64, 100])
def test_sparse_mm_on_sparse_tensor_cores(dtype, m):
    a = s24.sparse24_relu_reference(randn(m, 256, dtype=dtype))
    b = randn(256, 72, dtype=dtype)
    assert mm24.sparse_mm_applies(a, b)
    out = torch.ops.fvcompile.sparse24_mm(a, b)
    torch.testing.assert_close(out.float(), a.float() @ b.float(), **MM_TOL[dtype])
    values, meta = torch.ops.fvcompile.relu2_sparse24_pack(randn(m, 256, dtype=dtype))
    assert values.is_cuda and meta.dtype == torch.int16


# ---- the GPU glue, on CPU: PyTorch's sparse matmuls replaced by reference stand-ins -----------

@pytest.fixture
def fake_sparse_matmuls(monkeypatch):
    """Stand-ins with the real call signatures: the CUTLASS matmul unpacks our CUTLASS metadata,
    the cuSPARSELt matmul unpacks our cuSPARSELt layout, and cuSPARSELt's own "compression" keeps
    the tensor as it is (so a missing selection would show)."""
    from fvcompile.kernels.sparse24_cslt import cslt_sparse_mm_reference

    def cutlass_mm(values, meta, b):
        return cutlass.unpack_reference(values, meta, values.shape[0]) @ b

    def cslt_mm(c, b, transpose_result=False, **kwargs):
        if c.shape[1] != b.shape[0]:  # our packed layout
            return cslt_sparse_mm_reference(c, b, transpose_result=transpose_result, **kwargs)
        return (c @ b).t().contiguous() if transpose_result else c @ b  # "compressed" by the stand-in above

    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", cutlass_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_compress", lambda a: a, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", cslt_mm, raising=False)


@pytest.mark.skipif(DEVICE != "cpu", reason="stand-ins for the CUDA-only matmuls")
@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("square", [False, True])
def test_sparse_mm_backends_select_pad_and_probe(fake_sparse_matmuls, backend, square):
    a = randn(50, 128, dtype=torch.float16)  # dense: the backend must select (select=True)
    b = randn(128, 20, dtype=torch.float16)  # N not a multiple of 8: padded, then sliced back
    masked = s24.sparse24_mask_reference(a)
    operand = (masked.float() ** 2).half() if square else masked
    expected = operand.float() @ b.float()
    torch.testing.assert_close(backends.SPARSE_MM[backend](a, b, True, square).float(), expected,
                               **MM_TOL[torch.float16])
    out = backends.SPARSE_MM[backend](masked, b, False, square)
    assert out.shape == (50, 20)
    torch.testing.assert_close(out.float(), expected, **MM_TOL[torch.float16])
    # A transposed view (the weight gradient's operand) is read as it is.
    at = randn(128, 50, dtype=torch.float16).t()
    torch.testing.assert_close(backends.SPARSE_MM[backend](at, b, True, False).float(),
                               s24.sparse24_mask_reference(at).float() @ b.float(), **MM_TOL[torch.float16])
    # transpose_out=True: the product transposed, contiguous (the weight gradient's layout).
    transposed = backends.SPARSE_MM[backend](masked, b, False, square, False, True)
    assert transposed.shape == (20, 50) and transposed.is_contiguous()
    torch.testing.assert_close(transposed.float(), expected.t(), **MM_TOL[torch.float16])
    # relu=True: h itself, relu'd before the selection.
    relu_h = s24.sparse24_mask_reference(torch.relu(a))
    torch.testing.assert_close(backends.SPARSE_MM[backend](a, b, False, square, True).float(),
                               ((relu_h.float() ** 2).half() if square else relu_h).float() @ b.float(),
                               **MM_TOL[torch.float16])
    assert backends._probe(backend, torch.device("cpu"))


# ---- the probe runs in a child process ---------------------------------------------------------

def test_probe_in_child_finds_no_sparse_matmul_on_cpu():
    backend, fp8, why, scales_in_matmul = backends._probe_in_child("cpu")  # the real child: imports us, probes all
    assert backend is None and fp8 == "no" and "no sparse matmul" in why and not scales_in_matmul, why


def test_probe_in_child_survives_a_crash(monkeypatch):
    # A probe that kills its process (as a broken CUDA context can) costs the backend, not us.
    monkeypatch.setattr(backends, "_PROBE_CHILD", "import os; os.abort()  # {device}")
    backend, fp8, why, _ = backends._probe_in_child("cuda:0")
    assert backend is None and fp8 == "no" and "the probe process failed (exit code -6)" in why, why


def test_a_probe_dying_in_its_fp8_part_keeps_the_backend(monkeypatch):
    monkeypatch.setattr(backends, "_PROBE_CHILD", "import os; print('backend: cusparselt', flush=True); os.abort()  # {device}")
    assert backends._probe_in_child("cuda:0") == ("cusparselt", "no", "", False)


def test_a_probe_dying_in_its_fp8_epilogue_part_keeps_fp8(monkeypatch):
    # The epilogue's alpha vector is probed last: a crash there costs only the epilogue.
    monkeypatch.setattr(backends, "_PROBE_CHILD", "import os; print('backend: cusparselt'); print('fp8: yes', flush=True); "
                                             "os.abort()  # {device}")
    assert backends._probe_in_child("cuda:0") == ("cusparselt", "yes", "", False)
    monkeypatch.setattr(backends, "_PROBE_CHILD", "print('backend: cusparselt'); print('fp8: not transposed'); "
                                             "print('fp8 scales in matmul: yes')  # {device}")
    assert backends._probe_in_child("cuda:0") == ("cusparselt", "not transposed", "", True)


def test_probe_without_the_search_where_the_search_breaks_the_gpu(monkeypatch):
    # A child that dies only while cuSPARSELt searches: the second child, searching nothing, finds
    # the backend, and this process then takes cuSPARSELt's default plans.
    monkeypatch.setattr(backends, "_PROBE_CHILD", "import os; os.environ.get('FVCOMPILE_CSLT_SEARCH') == '0' or os.abort(); "
                                             "print('backend: cusparselt'); print('fp8: yes')  # {device}")
    monkeypatch.setattr(backends, "_cslt_search", True)
    monkeypatch.setattr(backends, "cslt_search_off", "")
    with pytest.warns(UserWarning, match="failed with cuSPARSELt's algorithm search"):
        assert backends._probe_in_child("cuda:0") == ("cusparselt", "yes", "", False)
    assert "exit code -6" in backends.cslt_search_off
    assert backends.cslt_plan(torch.zeros(64, 72), torch.zeros(128, 8), False) == {}


@pytest.mark.parametrize("k", [64, 18])  # 18: padded to 64 like any K
def test_sparse_mm_strided_k_selects_in_the_strided_order(k):
    from fvcompile.kernels.sparse24_cslt import strided_order

    gen = torch.Generator().manual_seed(7)
    a = torch.randn(12, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.ops.fvcompile.sparse24_mm(a, b, strided_k=True)
    order = strided_order(64)  # K padded with zeros to 64 first
    padded = torch.nn.functional.pad(a.detach(), (0, 64 - k))
    keep = torch.zeros_like(padded, dtype=torch.bool)
    keep[:, order] = s24.mask24(padded[:, order].abs())
    keep = keep[:, :k]
    expected = torch.where(keep, a.detach(), 0) @ b.detach()
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, torch.ops.fvcompile.sparse24_mm(a, b))  # the grouping matters
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(a.grad, (torch.ones_like(out) @ b.detach().t()) * keep)
    torch.testing.assert_close(b.grad, torch.where(keep, a.detach(), 0).t() @ torch.ones_like(out))


def test_cslt_plan_takes_the_search_split_k_settings_and_skips_transposed_results(monkeypatch):
    from types import SimpleNamespace

    searched = []

    def mm_search(compressed, b, bias, alpha, out_dtype, transpose_result):
        searched.append(transpose_result)
        return (7, 2, 1, 40) if alpha is None else (3, 1, 1, 40)

    monkeypatch.setattr(torch._C, "_cusparselt", SimpleNamespace(mm_search=mm_search), raising=False)
    monkeypatch.setattr(backends, "_CSLT_PLANS", {})
    c, b = torch.zeros(64, 72), torch.zeros(128, 8)
    assert backends.cslt_plan(c, b, False) == {"alg_id": 7, "split_k": 2, "split_k_mode": 1}
    assert backends.cslt_plan(c, b, False) == {"alg_id": 7, "split_k": 2, "split_k_mode": 1}  # cached
    assert backends.cslt_plan(c, b, True) == {}  # the transposed search breaks the CUDA context (H200)
    assert backends.cslt_plan(c, b, False, alpha=torch.ones(64)) == {"alg_id": 3, "split_k": 1, "split_k_mode": 1}
    assert searched == [False, False]  # an alpha vector is searched for on its own
