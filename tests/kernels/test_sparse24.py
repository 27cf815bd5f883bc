"""sparse24 kernels vs their PyTorch reference (Triton interpreter on CPU, real kernels on CUDA).

Run on a machine without a GPU with TRITON_INTERPRET=1 (tests/conftest.py sets it). On a GPU
machine the same tests launch the compiled kernels on CUDA tensors, and the sparse-matmul tests
run on the sparse tensor cores when the device has them.
"""
import pytest
import torch

import fvcompile.kernels  # noqa: F401 - registers the ops
from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels.sparse24_schedule import WarmupSchedule

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
    """The FP8 scales' maxima, reduced from the tiles' maxima, equal the reference's reductions."""
    h = randn(*shape, dtype=dtype)
    r, rows, cols = s24.sparse24_relu_max_triton(h)
    r_ref, rows_ref, cols_ref = s24.sparse24_relu_max_reference(h)
    assert torch.equal(r, r_ref) and torch.equal(rows, rows_ref) and torch.equal(cols, cols_ref)
    assert rows.shape == (h.numel() // shape[-1],) and cols.shape == (shape[-1],) and rows.dtype == torch.float32
    # The op: the same, its fake gives the shapes, and in a dense warm-up the maxima are of relu(h).
    assert all(torch.equal(x, y) for x, y in zip(torch.ops.fvcompile.sparse24_relu_max(h), (r, rows, cols)))
    schedule = WarmupSchedule(1)
    dense = torch.ops.fvcompile.sparse24_relu_max(h, schedule=schedule.key("site"), count_step=True)  # step 0 of 1
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
        out = torch.ops.fvcompile.sparse24_weight_grad_mm(torch.empty(128, 21), torch.empty(21, 40),
                                                          transpose_out=True)
        assert out.shape == (40, 128)


@pytest.mark.skipif(DEVICE != "cpu", reason="opcheck runs the CPU path")
def test_opcheck():
    h = torch.randn(33, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.fvcompile.sparse24_relu.default, (h,))
    torch.library.opcheck(torch.ops.fvcompile.sparse24_relu_max.default, (h,))
    a = s24.sparse24_relu_reference(torch.randn(33, 64)).requires_grad_()
    torch.library.opcheck(torch.ops.fvcompile.sparse24_mm.default, (a, torch.randn(64, 8)))
    a_max = a.detach().abs().amax(1)
    torch.library.opcheck(torch.ops.fvcompile.sparse24_mm.default, (a, torch.randn(64, 8), a_max),
                          {"fp8": True, "select": False})
    s = a.detach().t().contiguous().requires_grad_()  # (hidden, tokens): a weight gradient's operand
    torch.library.opcheck(torch.ops.fvcompile.sparse24_weight_grad_mm.default, (s, torch.randn(33, 8)),
                          {"square": True, "transpose_out": True, "dense_rows": 0.1})
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
    schedule = WarmupSchedule(2)
    key = schedule.key("ffn#0")

    def relu(count_step):
        return torch.ops.fvcompile.sparse24_relu(h, schedule=key, count_step=count_step)

    # Before any counted step a reader is dense; steps 0 and 1 are dense, step 2 on sparse.
    assert torch.equal(relu(False), dense)
    assert torch.equal(relu(True), dense)  # step 0
    assert torch.equal(relu(False), dense)  # a reader in step 0
    assert torch.equal(relu(True), dense)  # step 1
    assert torch.equal(relu(True), sparse)  # step 2
    assert torch.equal(relu(False), sparse)
    assert schedule.steps_counted("ffn#0") == 3 and schedule.counters() == {"ffn#0": 3}
    assert torch.equal(torch.ops.fvcompile.sparse24_relu(h), sparse)  # no schedule: always sparse
    schedule.reset()  # counted again from step 0
    assert torch.equal(relu(True), dense) and schedule.steps_counted("ffn#0") == 1


def test_warmup_schedule_goes_with_its_owner():
    """The counters belong to the schedule (the pass that made it), not to the process: once the
    schedule is freed, an op still naming it says so instead of guessing a step."""
    import gc

    schedule = WarmupSchedule(1)
    key = schedule.key("ffn#0")
    del schedule
    gc.collect()
    with pytest.raises(RuntimeError, match="is gone"):
        torch.ops.fvcompile.sparse24_relu(torch.randn(4, 64), schedule=key)
