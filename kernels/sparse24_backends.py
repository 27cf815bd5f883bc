"""Which 2:4 sparse matmul a GPU runs, and how each one is called.

Backends (`sparse_mm_backend`, chosen per GPU by a probe matmul in a child process, since a
failing sparse matmul can break the CUDA context of the process it runs in):

- "cutlass" (sm8x): our CUTLASS-layout pack (kernels/sparse24_cutlass.py) +
  `torch._sparse_semi_structured_mm` (PyTorch's CUTLASS kernel runs on sm8x only);
- "cusparselt" (Hopper): our cuSPARSELt-layout pack (kernels/sparse24_cslt.py) +
  `torch._cslt_sparse_mm`, the algorithm searched once per shape (`cslt_plan`); the FP8 matmul
  (kernels/sparse24_fp8.py) runs here only, with its own probe;
- "cusparselt-compress", the last resort: `torch._cslt_compress` + `torch._cslt_sparse_mm`,
  correct on every GPU but slow (cuSPARSELt's compress runs far below memory speed).

Each takes (a, b, *, select, square, relu, transpose_out) as `sparse24_matmul` (kernels/sparse24_mm.py)
does, with `a` of a dtype in PACK_DTYPES and K a multiple of ALIGN_K.
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from fvcompile.kernels import sparse24_cslt as cslt
from fvcompile.kernels.sparse24 import pad_cols, sparse24_mask_reference, sparse24_select_triton, squared
from fvcompile.kernels.sparse24_cutlass import cutlass_mm

# ---------------------------------------------------------------------------------------------
# The backends: pack, then multiply
# ---------------------------------------------------------------------------------------------

_CSLT_PLANS: dict[tuple, dict] = {}  # (shapes, strides, dtype, device, out dtype) -> _cslt_sparse_mm kwargs
# Whether cslt_plan searches; the probe turns it off where the search breaks the GPU (_probe_in_child).
_cslt_search = os.environ.get("FVCOMPILE_CSLT_SEARCH", "1") != "0"
cslt_search_off = ""  # why the probe turned it off, for reports


def cslt_plan(compressed: Tensor, b: Tensor, transpose_out: bool, out_dtype=None, alpha: Tensor | None = None) -> dict:
    """cuSPARSELt's fastest configuration for this problem, searched once per shape: the algorithm
    and, where this build's search reports them (`torch._C._cusparselt.mm_search`), its split-K
    settings; {} (the defaults) where there is no search, or where the probe turned it off.

    A transposed result takes the defaults: the search with transpose_result=True can fail with
    "internal error" and leave the CUDA context broken (illegal instruction at the next kernel),
    while the matmul itself is right (bench/diag/cslt_diag.py)."""
    if transpose_out or not _cslt_search:
        return {}
    key = (tuple(compressed.shape), tuple(b.shape), b.stride(), b.dtype, b.device, out_dtype, alpha is not None)
    if key not in _CSLT_PLANS:
        plan = {}
        try:
            alg_id, split_k, split_k_mode, _ = torch._C._cusparselt.mm_search(compressed, b, None, alpha, out_dtype,
                                                                              False)
            plan = {"alg_id": int(alg_id), "split_k": int(split_k), "split_k_mode": int(split_k_mode)}
        except (RuntimeError, AttributeError, TypeError, ValueError):  # an older build: the algorithm only
            try:
                plan = {"alg_id": int(torch._cslt_sparse_mm_search(compressed, b, alpha=alpha, out_dtype=out_dtype))}
            except (RuntimeError, AttributeError):  # no search in this build
                pass
        _CSLT_PLANS[key] = plan
    return _CSLT_PLANS[key]


def cslt_mm(compressed: Tensor, b: Tensor, m: int, transpose_out: bool, out_dtype=None,
            alpha: Tensor | None = None, n: int | None = None) -> Tensor:
    """compressed (m_pad rows) @ b, sliced to m rows and n columns (default: b's); transpose_out:
    its transpose, (n, m), written in that layout by cuSPARSELt itself (the weight gradient's
    layout: no copy). alpha: fp32 (m_pad,), row i of the product times alpha[i] in cuSPARSELt's
    epilogue (its "alpha vector scaling"), before the product is rounded to out_dtype."""
    n = b.shape[1] if n is None else n
    b = pad_cols(b, 8)
    out = torch._cslt_sparse_mm(compressed, b, alpha=alpha, out_dtype=out_dtype, transpose_result=transpose_out,
                                **cslt_plan(compressed, b, transpose_out, out_dtype, alpha))
    # Padding sliced off; the copy keeps the output contiguous, as the op's fake promises.
    out = out[:n, :m] if transpose_out else out[:m, :n]
    return out if out.is_contiguous() else out.contiguous()


def cusparselt_mm(a: Tensor, b: Tensor, *, select: bool = True, square: bool = False, relu: bool = False,
                  transpose_out: bool = False, strided_k: bool = False) -> Tensor:
    # One pass over `a` (a transposed view is read in place): relu, select, square, pack.
    compressed = cslt.cslt_pack_triton(a, square=square, relu=relu, strided_k=strided_k)
    return cslt_mm(compressed, b, a.shape[0], transpose_out)


def cusparselt_compress_mm(a: Tensor, b: Tensor, *, select: bool = True, square: bool = False, relu: bool = False,
                           transpose_out: bool = False) -> Tensor:
    # cuSPARSELt's own compress keeps whatever 2 of 4 it finds: an `a` that is not 2:4 yet (the
    # token-wise selection of the weight gradient) is selected first.
    m = a.shape[0]
    if relu:
        a = torch.relu(a)
    if select or relu:
        a = sparse24_select_triton(a)
    if square:
        a = squared(a)
    a = torch.nn.functional.pad(a, (0, 0, 0, (-m) % 16)).contiguous()
    return cslt_mm(torch._cslt_compress(a), b, m, transpose_out)


# In order of preference.
SPARSE_MM = {"cutlass": cutlass_mm, "cusparselt": cusparselt_mm, "cusparselt-compress": cusparselt_compress_mm}
BACKENDS = tuple(SPARSE_MM)


# ---------------------------------------------------------------------------------------------
# The probe: which backend works on this GPU (in a child process)
# ---------------------------------------------------------------------------------------------

def _probe(backend: str, device: torch.device) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(96, 128, device=device, dtype=torch.float16, generator=gen)  # 96: padded rows too
    b = torch.randn(128, 64, device=device, dtype=torch.float16, generator=gen)
    a = sparse24_mask_reference(a)
    out = SPARSE_MM[backend](a, b, select=False)
    transposed = SPARSE_MM[backend](a, b, select=False, transpose_out=True)  # the weight gradient's layout
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    expected = a.float() @ b.float()
    return all(bool(torch.allclose(x.float(), expected, atol=0.1, rtol=1e-2)) for x in (out, transposed.t()))


def first_working_backend(device) -> str | None:
    """The first of BACKENDS whose probe matmul equals the dense product here, in this process."""
    for backend in BACKENDS:
        try:
            if _probe(backend, torch.device(device)):
                return backend
        except Exception:  # noqa: BLE001 - any failure means "not on this device"
            continue
    return None


# The child searches the parent's sys.path first, in the parent's order: a PYTHONPATH would come
# after the child's cwd, where a checkout's bare fvcompile/ folder can shadow the package that the
# parent imported (it did on a GPU machine: "No module named 'fvcompile.passes'").
_PROBE_CHILD = ("import sys; sys.path[:0] = {path!r}; "
                "from fvcompile.kernels.sparse24_backends import probe_report; probe_report({device!r})")


def probe_report(device) -> None:
    """What the probe child prints: a line per finding, each flushed as soon as it is known, the
    riskiest last, so that a crash loses only the findings after it."""
    backend = first_working_backend(device)
    print("backend:", backend, flush=True)
    fp8 = fp8_probe(device) if backend == "cusparselt" else "no"
    print("fp8:", fp8, flush=True)
    if fp8 != "no":
        print("fp8 scales in matmul:", "yes" if fp8_probe(device, True) == fp8 else "no", flush=True)


def fp8_probe(device, scales_in_matmul: bool = False) -> str:
    """Whether the FP8 2:4 matmul (our FP8 pack + cuSPARSELt) matches its reference here, with and
    without a transposed result: "yes" or "no". scales_in_matmul: with cuSPARSELt's epilogue
    applying the scales (its alpha vector), not a pass of ours after it."""
    from fvcompile.kernels.sparse24_fp8 import fp8_exact_operands, fp8_mm_cusparselt, fp8_mm_reference

    # One output tile and a long K: the search may split K (and a split-K epilogue must scale too)
    a, b = (t.to(device) for t in fp8_exact_operands(96, 512, 64))

    def matches(transpose_out: bool) -> bool:
        try:
            got = fp8_mm_cusparselt(a, b, transpose_out=transpose_out, scales_in_matmul=scales_in_matmul)
            expected = fp8_mm_reference(a, b, transpose_out=transpose_out)
            # Relative to the largest entry: Hopper's FP8 tensor cores accumulate with fewer bits
            # than fp32, which elementwise rtol fails near zero.
            got, expected = got.float(), expected.float()
            return bool((got - expected).abs().max() <= 1e-2 * expected.abs().max())
        except Exception:  # noqa: BLE001 - any failure means "not here"
            return False

    return "yes" if matches(False) and matches(True) else "no"


class ProbeResult(NamedTuple):
    backend: str | None  # one of BACKENDS, or None
    fp8: str  # fp8_probe's answer
    why: str  # why no backend ("" where there is one)
    fp8_scales_in_matmul: bool = False  # fp8_probe(scales_in_matmul=True) answered as fp8_probe did


def _probe_in_child(device: str) -> ProbeResult:
    """Probe in a process of its own: a sparse matmul that fails can leave the CUDA context broken,
    which no exception handler can undo (a failing cuSPARSELt search has been followed by an
    illegal instruction at every later kernel). Where no backend works with
    cuSPARSELt's algorithm search and one does without it, this process stops searching (`cslt_plan`
    takes the defaults) and warns."""
    global _cslt_search, cslt_search_off
    found = _probe_child(device, {})
    if found[0] is None and _cslt_search:
        retry = _probe_child(device, {"FVCOMPILE_CSLT_SEARCH": "0"})
        if retry[0] is not None:
            _cslt_search = False
            cslt_search_off = (f"the 2:4 probe failed with cuSPARSELt's algorithm search ({found[2]}) and "
                               "passed without it: default algorithms from now on")
            warnings.warn(f"fvcompile.sparse24: {cslt_search_off}", stacklevel=2)
            return retry
    return found


def _probe_child(device: str, env_extra: dict) -> ProbeResult:
    import subprocess
    import sys

    path = [os.path.abspath(p) for p in sys.path]  # import what we import ('' is the cwd)
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD.format(path=path, device=device)],
                              env={**os.environ, **env_extra},
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return ProbeResult(None, "no", "the probe process timed out")
    # Every line printed was found before any crash; a line missing is a "no" (probe_report).
    said = {key: value.strip() for key, _, value in (line.partition(":") for line in proc.stdout.splitlines())}
    if said.get("backend") in BACKENDS:
        return ProbeResult(said["backend"], "yes" if said.get("fp8") == "yes" else "no", "",
                           said.get("fp8 scales in matmul") == "yes")
    if proc.returncode == 0 and "backend" in said:
        return ProbeResult(None, "no", f"no sparse matmul of {', '.join(BACKENDS)} matched the dense product in the probe")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ProbeResult(None, "no", f"the probe process failed (exit code {proc.returncode}): {last[:200]}")


# ---------------------------------------------------------------------------------------------
# What the device runs (probed once per CUDA device, cached)
# ---------------------------------------------------------------------------------------------

_PROBED: dict[int, ProbeResult] = {}  # CUDA device index -> what its one-time probe found


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sparse_mm_backend(device) -> str | None:
    """The 2:4 sparse matmul this device runs, or None:

    - "cutlass": our CUTLASS-layout pack + `torch._sparse_semi_structured_mm` (sm8x only);
    - "cusparselt": our cuSPARSELt-layout pack (kernels/sparse24_cslt.py) + `torch._cslt_sparse_mm`;
    - "cusparselt-compress": `torch._cslt_compress` + `torch._cslt_sparse_mm` (slow compress;
      for a GPU whose cuSPARSELt layout differs from the one our pack writes).

    Needs a CUDA GPU of compute capability 8.0 or newer, and a one-time probe (a small sparse
    matmul of each backend checked against the dense product, in a child process) to succeed;
    cached per device. `no_sparse_mm_reason` says why not.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = _cuda_index(device)
    if index not in _PROBED:
        _PROBED[index] = (_probe_in_child(f"cuda:{index}") if torch.cuda.get_device_capability(index) >= (8, 0)
                          else ProbeResult(None, "no", "2:4 sparse tensor cores need sm80 or newer"))
    return _PROBED[index].backend


def no_sparse_mm_reason(device) -> str:
    """Why `device` runs no 2:4 sparse matmul ("" where it does), for the pass's report."""
    device = torch.device(device)
    if sparse_mm_backend(device) is not None:
        return ""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{device} has no 2:4 sparse tensor cores"
    index = _cuda_index(device)
    return f"{torch.cuda.get_device_name(index)}: {_PROBED[index].why}"


def fp8_sparse_mm_available(device) -> bool:
    """Whether `device` runs FP8 2:4 matmuls (cuSPARSELt on Hopper; one-time probe, cached)."""
    if sparse_mm_backend(device) != "cusparselt":
        return False
    return _PROBED[_cuda_index(torch.device(device))].fp8 == "yes"


def fp8_scales_in_matmul(device) -> bool:
    """Whether cuSPARSELt's epilogue applies the FP8 scales on `device` (else a pass of ours does)."""
    if not fp8_sparse_mm_available(device):
        return False
    return _PROBED[_cuda_index(torch.device(device))].fp8_scales_in_matmul


def sparse_tensor_cores_available(device) -> bool:
    """Whether `device` runs 2:4 sparse matmuls on sparse tensor cores (one-time probe, cached)."""
    return sparse_mm_backend(device) is not None

