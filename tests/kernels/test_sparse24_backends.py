"""Which 2:4 sparse matmul a GPU runs: the probe (in a child process), the backends' glue (on CPU,
with PyTorch's sparse matmuls replaced by reference stand-ins), and cuSPARSELt's plans."""
import pytest
import torch

from fvcompile.kernels import sparse24 as s24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_cutlass as cutlass
from fvcompile.kernels import sparse24_mm as mm24
from test_sparse24 import DEVICE, MM_TOL, PACK_DTYPES, randn  # tests/kernels/, beside this file


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
    torch.testing.assert_close(backends.SPARSE_MM[backend](a, b, select=True, square=square).float(), expected,
                               **MM_TOL[torch.float16])
    out = backends.SPARSE_MM[backend](masked, b, select=False, square=square)
    assert out.shape == (50, 20)
    torch.testing.assert_close(out.float(), expected, **MM_TOL[torch.float16])
    # A transposed view (the weight gradient's operand) is read as it is.
    at = randn(128, 50, dtype=torch.float16).t()
    torch.testing.assert_close(backends.SPARSE_MM[backend](at, b, select=True).float(),
                               s24.sparse24_mask_reference(at).float() @ b.float(), **MM_TOL[torch.float16])
    # transpose_out=True: the product transposed, contiguous (the weight gradient's layout).
    transposed = backends.SPARSE_MM[backend](masked, b, select=False, square=square, transpose_out=True)
    assert transposed.shape == (20, 50) and transposed.is_contiguous()
    torch.testing.assert_close(transposed.float(), expected.t(), **MM_TOL[torch.float16])
    # relu=True: h itself, relu'd before the selection.
    relu_h = s24.sparse24_mask_reference(torch.relu(a))
    torch.testing.assert_close(backends.SPARSE_MM[backend](a, b, select=False, square=square, relu=True).float(),
                               ((relu_h.float() ** 2).half() if square else relu_h).float() @ b.float(),
                               **MM_TOL[torch.float16])
    assert backends._probe(backend, torch.device("cpu"))


# ---- the probe runs in a child process ---------------------------------------------------------

def test_probe_in_child_finds_no_sparse_matmul_on_cpu(monkeypatch):
    # One real child, not two: with the search on, a child finding nothing is followed by a second
    # one without it, whose outcome the stand-in children below check (both failing: the first's
    # answer stands; the second finding a backend: that backend, with a warning).
    monkeypatch.setattr(backends, "_cslt_search", False)
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
    monkeypatch.setattr(backends, "_PROBE_CHILD", "print('backend: cusparselt'); print('fp8: yes'); "
                                             "print('fp8 scales in matmul: yes')  # {device}")
    assert backends._probe_in_child("cuda:0") == ("cusparselt", "yes", "", True)


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
