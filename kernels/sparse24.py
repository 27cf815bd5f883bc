"""2:4 activation sparsity: Triton kernels, `torch.library` ops, a PyTorch reference, fake impls.

2:4 sparsity keeps the 2 largest of every group of 4 consecutive values along the last
(reduction) dimension and zeroes the other 2. Ties go to the lower index, identically in the
kernels and in the reference, so "which two" is a deterministic function of the input.

Ops (namespace `fvcompile`, called as `torch.ops.fvcompile.<name>`):

- `sparse24_relu(h)`: relu(h) with only the 2 largest of every 4 kept. Differentiable:
  grad * (out > 0). Squaring is monotone on relu's output, so this is also the mask of relu(h)²
  (see passes/sparse24.py for why the pass replaces the relu node).
- `sparse24_relu_max(h) -> (r, row_max, col_max)`: the same r, and the largest value of its every
  row and column from the same pass (the FP8 scales of the matmuls that read r; `a_max` below).
- `sparse24_mm(a, b)`: mask24(a) @ b, the 2 largest magnitudes of every 4 of `a` (M, K) along K
  kept. On a GPU with 2:4 sparse tensor cores it selects, packs and runs the sparse matmul;
  elsewhere it runs the emulated path: a dense matmul of the masked tensor (same numbers up to
  accumulation order). For an `a` that already is 2:4 the selection changes nothing. Prologues
  fused into the pack: `square` (mask24(a)² @ b: the forward passes the sparse relu r, so r² is
  never written) and `relu` (h itself: relu, 2:4, square and pack in one pass). `fp8=True`
  multiplies in float8_e4m3fn (kernels/sparse24_fp8.py), with `a`'s row maxima from `a_max`
  where the caller has them.

Sparse matmul backends (`sparse_mm_backend`, chosen per GPU by a probe matmul in a child process,
since a failing sparse matmul can break the CUDA context of the process it runs in): on sm8x, our
CUTLASS-layout pack (`kernels/sparse24_cutlass.py`, with its ops `relu2_sparse24_pack` and
`sparse24_pack`) + `torch._sparse_semi_structured_mm` (PyTorch's CUTLASS kernel runs on sm8x
only); on Hopper, our cuSPARSELt-layout pack (`kernels/sparse24_cslt.py`) + `torch._cslt_sparse_mm`,
the algorithm searched once per shape; as a last resort `torch._cslt_compress`, correct on every
GPU but slow (6.7 ms where our pack takes 0.2 ms on an H100).

Dense warm-up: `sparse24_relu` and `sparse24_mm` take an optional schedule (a key, a number of
dense steps, and whether this call counts a step). The counting op of each site (the relu in the
training graph) increments a per-key step counter in this process; while the current step is below
`dense_steps` every op of that key runs dense. See `_in_dense_warmup`.

On CPU the ops run the reference. The Triton kernels run on CUDA tensors and, for the tests, in
the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1` set before this module is imported);
the interpreter cannot run on the fake tensors of a compiled graph, so compiled CPU graphs always
take the reference path. The kernels compare and square in fp32, which is exact for fp16/bf16
inputs; note that the interpreter (not a GPU) rounds fp32 -> bf16 by truncation, which is why the
bf16 relu² packing test uses inputs whose squares are exact.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path still works; only the kernels need Triton
    triton = None

ALIGN_K = 64  # the sparse matmul's operand needs K % 64 == 0 (CUTLASS fp16/bf16 minimum)
PACK_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference (plain PyTorch): the CPU implementation and the test oracle.
# ---------------------------------------------------------------------------------------------

def mask24(scores: Tensor) -> Tensor:
    """Boolean mask keeping the 2 largest scores of every 4 along the last dim (ties: lower index).

    A last dim that is not a multiple of 4 (a token count, for the weight gradient's selection
    along tokens) ends in a short group, padded with scores that never win.
    """
    k = scores.shape[-1]
    if k % 4:
        padded = torch.nn.functional.pad(scores, (0, -k % 4), value=-torch.inf)
        return mask24(padded)[..., :k]
    s = scores.unflatten(-1, (-1, 4)).unbind(-1)
    beaten = [torch.zeros_like(s[0], dtype=torch.uint8) for _ in range(4)]  # how many others beat each
    for i in range(4):
        for j in range(i + 1, 4):  # i comes first: it wins a tie
            beaten[i] += s[j] > s[i]
            beaten[j] += s[i] >= s[j]
    return torch.stack([b < 2 for b in beaten], -1).flatten(-2)


def sparse24_relu_reference(h: Tensor) -> Tensor:
    r = torch.relu(h)
    return torch.where(mask24(r), r, torch.zeros((), dtype=r.dtype, device=r.device)).contiguous()


def row_col_max(r: Tensor) -> tuple[Tensor, Tensor]:
    """The largest |value| of every row and every column of r flattened to 2-D, in fp32."""
    r2 = r.reshape(-1, r.shape[-1]).abs().float()
    return r2.amax(1), r2.amax(0)


def sparse24_relu_max_reference(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r = sparse24_relu_reference(h)
    return (r, *row_col_max(r))


def sparse24_mask_reference(x: Tensor) -> Tensor:
    """x with only the 2 largest magnitudes of every 4 kept."""
    return torch.where(mask24(x.abs()), x, torch.zeros((), dtype=x.dtype, device=x.device)).contiguous()


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _keep_top2(s0, s1, s2, s3):
        # Keep a value when fewer than 2 of the others beat it; on a tie the lower index wins.
        k0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)) < 2
        k1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)) < 2
        k2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)) < 2
        k3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)) < 2
        return k0, k1, k2, k3

    @triton.jit
    def _split4(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # (BLOCK_M, BLOCK_K) -> the 4 members of each group of 4 columns, each (BLOCK_M, BLOCK_K/4, 1).
        # [g, i, j] of the reshape is column 4g + 2i + j.
        even, odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 4, 2, 2)))  # j = 0, j = 1
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def _join4(x0, x1, x2, x3, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # The inverse of _split4.
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (BLOCK_M, BLOCK_K))

    @triton.jit
    def _select24_kernel(x_ptr, out_ptr, row_max_ptr, col_max_ptr, M, K, stride_xm, stride_xk, stride_out,
                         RELU: tl.constexpr, WITH_MAX: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        # RELU: keep the 2 largest of relu(x); else keep the 2 largest magnitudes of x. One
        # (BLOCK_M, BLOCK_K) tile per program, split into groups in registers. x may be a transposed
        # view (the weight gradient selects along tokens): the tile load reads it in place.
        # WITH_MAX: also the largest kept |value| of every row and column (fp32, zero-initialized),
        # by atomic max over the tiles: the FP8 scales of both matmuls that read the output.
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)  # K % 4 == 0: groups are all in or all out
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
            s0, s1, s2, s3 = _split4(x, BLOCK_M, BLOCK_K)
        else:
            s0, s1, s2, s3 = _split4(tl.abs(x), BLOCK_M, BLOCK_K)
        k0, k1, k2, k3 = _keep_top2(s0, s1, s2, s3)
        keep = _join4(k0.to(tl.int8), k1.to(tl.int8), k2.to(tl.int8), k3.to(tl.int8), BLOCK_M, BLOCK_K)
        out = tl.where(keep != 0, x, 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)
        if WITH_MAX:
            kept = tl.abs(out.to(tl.float32))  # zero outside the tile's mask (loaded as 0)
            tl.atomic_max(row_max_ptr + rows, tl.max(kept, 1), mask=rows < M)
            tl.atomic_max(col_max_ptr + cols, tl.max(kept, 0), mask=cols < K)

    @triton.jit
    def _pick(idx, w0, w1, w2, w3):
        return tl.where(idx == 0, w0, tl.where(idx == 1, w1, tl.where(idx == 2, w2, w3)))

def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the sparse24 Triton kernels need the `triton` package")


def _select_triton(h: Tensor, relu: bool, block_m: int, block_k: int, with_max: bool = False):
    _need_triton()
    if h.shape[-1] % 4:
        raise ValueError(f"2:4 selection needs the last dim to be a multiple of 4, got {h.shape[-1]}")
    x = h.reshape(-1, h.shape[-1])  # a 2-D view stays a view, transposed or not
    out = torch.empty(x.shape, dtype=h.dtype, device=h.device)
    m, k = x.shape
    # Without maxima the kernel never touches these: `out` is a placeholder pointer, no allocation.
    row_max, col_max = ((torch.zeros(n, dtype=torch.float32, device=h.device) for n in (m, k)) if with_max
                        else (out, out))
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _select24_kernel[grid](x, out, row_max, col_max, m, k, x.stride(0), x.stride(1), out.stride(0), RELU=relu,
                           WITH_MAX=with_max, BLOCK_M=block_m, BLOCK_K=block_k)
    return (out.view(h.shape), row_max, col_max) if with_max else out.view(h.shape)


def sparse24_relu_triton(h: Tensor, block_m: int = 16, block_k: int = 256) -> Tensor:
    """relu(h) with 2 of every 4 kept (CUDA tensors, or CPU tensors in the Triton interpreter)."""
    return _select_triton(h, True, block_m, block_k)


def sparse24_relu_max_triton(h: Tensor, block_m: int = 16, block_k: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """`sparse24_relu_triton`, and the maximum of its output's every row and every column (h
    flattened to 2-D, fp32) from the same pass: `sparse24_relu_max_reference`."""
    return _select_triton(h, True, block_m, block_k, with_max=True)


def sparse24_select_triton(x: Tensor, block_m: int = 16, block_k: int = 256) -> Tensor:
    """x with the 2 largest magnitudes of every 4 kept: the kernel of `sparse24_mask_reference`."""
    return _select_triton(x, False, block_m, block_k)


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and triton is not None


# ---------------------------------------------------------------------------------------------
# Devices: is there a 2:4 sparse matmul, and which one
# ---------------------------------------------------------------------------------------------

_PROBED: dict[int, ProbeResult] = {}  # CUDA device index -> what its one-time probe found


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _probe(backend: str, device: torch.device) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(96, 128, device=device, dtype=torch.float16, generator=gen)  # 96: padded rows too
    b = torch.randn(128, 64, device=device, dtype=torch.float16, generator=gen)
    a = sparse24_mask_reference(a)
    out = _SPARSE_MM[backend](a, b, False, False)
    transposed = _SPARSE_MM[backend](a, b, False, False, False, True)  # the weight gradient's layout
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    expected = a.float() @ b.float()
    return all(bool(torch.allclose(x.float(), expected, atol=0.1, rtol=1e-2)) for x in (out, transposed.t()))


BACKENDS = ("cutlass", "cusparselt", "cusparselt-compress")  # in order of preference


def first_working_backend(device) -> str | None:
    """The first of BACKENDS whose probe matmul equals the dense product here, in this process."""
    for backend in BACKENDS:
        try:
            if _probe(backend, torch.device(device)):
                return backend
        except Exception:  # noqa: BLE001 - any failure means "not on this device"
            continue
    return None


_PROBE_CHILD = "from fvcompile.kernels.sparse24 import probe_report; probe_report({device!r})"


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
    """Whether the FP8 2:4 matmul (our FP8 pack + cuSPARSELt) matches its reference here: "yes",
    "not transposed" (it does, but not with a transposed result) or "no". scales_in_matmul: with
    cuSPARSELt's epilogue applying the scales (its alpha vector), not a pass of ours after it."""
    from fvcompile.kernels.sparse24_fp8 import fp8_exact_operands, fp8_mm_cusparselt, fp8_mm_reference

    # One output tile and a long K: the search may split K (and a split-K epilogue must scale too)
    a, b = (t.to(device) for t in fp8_exact_operands(96, 512, 64))

    def matches(transpose_out: bool) -> bool:
        try:
            got = fp8_mm_cusparselt(a, b, True, False, False, transpose_out, scales_in_matmul=scales_in_matmul)
            expected = fp8_mm_reference(a, b, True, False, False, transpose_out)
            return bool(torch.allclose(got.float(), expected.float(), atol=0.1, rtol=2e-2))
        except Exception:  # noqa: BLE001 - any failure means "not here"
            return False

    if not matches(False):
        return "no"
    return "yes" if matches(True) else "not transposed"


class ProbeResult(NamedTuple):
    backend: str | None  # one of BACKENDS, or None
    fp8: str  # fp8_probe's answer
    why: str  # why no backend ("" where there is one)
    fp8_scales_in_matmul: bool = False  # fp8_probe(scales_in_matmul=True) answered as fp8_probe did


def _probe_in_child(device: str) -> ProbeResult:
    """Probe in a process of its own: a sparse matmul that fails can leave the CUDA context broken,
    which no exception handler can undo (on an H200 on 2026-11-26 a failing cuSPARSELt search was
    followed by an illegal instruction at every later kernel). Where no backend works with
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

    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # import what we import
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CHILD.format(device=device)], env=env,
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return ProbeResult(None, "no", "the probe process timed out")
    # Every line printed was found before any crash; a line missing is a "no" (probe_report).
    said = {key: value.strip() for key, _, value in (line.partition(":") for line in proc.stdout.splitlines())}
    if said.get("backend") in BACKENDS:
        fp8 = said.get("fp8", "no")
        return ProbeResult(said["backend"], fp8 if fp8 in ("yes", "not transposed") else "no", "",
                           said.get("fp8 scales in matmul") == "yes")
    if proc.returncode == 0 and "backend" in said:
        return ProbeResult(None, "no", f"no sparse matmul of {', '.join(BACKENDS)} matched the dense product in the probe")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ProbeResult(None, "no", f"the probe process failed (exit code {proc.returncode}): {last[:200]}")


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


def fp8_sparse_mm_available(device, transposed: bool = False) -> bool:
    """Whether `device` runs FP8 2:4 matmuls (cuSPARSELt on Hopper; one-time probe, cached), and
    with `transposed`, whether also with a transposed result."""
    if sparse_mm_backend(device) != "cusparselt":
        return False
    return _PROBED[_cuda_index(torch.device(device))].fp8 in (("yes",) if transposed else ("yes", "not transposed"))


def fp8_scales_in_matmul(device) -> bool:
    """Whether cuSPARSELt's epilogue applies the FP8 scales on `device` (else a pass of ours does)."""
    if not fp8_sparse_mm_available(device):
        return False
    return _PROBED[_cuda_index(torch.device(device))].fp8_scales_in_matmul


def sparse_tensor_cores_available(device) -> bool:
    """Whether `device` runs 2:4 sparse matmuls on sparse tensor cores (one-time probe, cached)."""
    return sparse_mm_backend(device) is not None


def _pad_cols(b: Tensor, multiple: int) -> Tensor:
    extra = (-b.shape[1]) % multiple
    return torch.nn.functional.pad(b, (0, extra)) if extra else b


def _squared(x: Tensor) -> Tensor:
    # Squared in (at least) fp32 and rounded once, as the kernels do.
    return (x.to(torch.promote_types(x.dtype, torch.float32)) ** 2).to(x.dtype)


def _cutlass_mm(*args, **kwargs) -> Tensor:
    from fvcompile.kernels.sparse24_cutlass import cutlass_mm

    return cutlass_mm(*args, **kwargs)


_CSLT_PLANS: dict[tuple, dict] = {}  # (shapes, strides, dtype, device, out dtype) -> _cslt_sparse_mm kwargs
# Whether cslt_plan searches; the probe turns it off where the search breaks the GPU (_probe_in_child).
_cslt_search = os.environ.get("FVCOMPILE_CSLT_SEARCH", "1") != "0"
cslt_search_off = ""  # why the probe turned it off, for reports


def cslt_plan(compressed: Tensor, b: Tensor, transpose_out: bool, out_dtype=None, alpha: Tensor | None = None) -> dict:
    """cuSPARSELt's fastest configuration for this problem, searched once per shape: the algorithm
    and, where this build's search reports them (`torch._C._cusparselt.mm_search`), its split-K
    settings; {} (the defaults) where there is no search, or where the probe turned it off.

    A transposed result takes the defaults: on an H200 (torch 2.11+cu130, cuSPARSELt 0.8,
    2026-11-26) the search with transpose_result=True fails with "internal error" and leaves the
    CUDA context broken (illegal instruction at the next kernel), while the matmul itself is right
    (bench/cslt_diag.py)."""
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


def _cslt_mm(compressed: Tensor, b: Tensor, m: int, transpose_out: bool, out_dtype=None,
             alpha: Tensor | None = None) -> Tensor:
    """compressed (m_pad rows) @ b, sliced to m rows; transpose_out: its transpose, (n, m),
    written in that layout by cuSPARSELt itself (the weight gradient's layout: no copy).
    alpha: fp32 (m_pad,), row i of the product times alpha[i] in cuSPARSELt's epilogue (its
    "alpha vector scaling"), before the product is rounded to out_dtype."""
    n = b.shape[1]
    b = _pad_cols(b, 8)
    out = torch._cslt_sparse_mm(compressed, b, alpha=alpha, out_dtype=out_dtype, transpose_result=transpose_out,
                                **cslt_plan(compressed, b, transpose_out, out_dtype, alpha))
    # Padding sliced off; the copy keeps the output contiguous, as the op's fake promises.
    out = out[:n, :m] if transpose_out else out[:m, :n]
    return out if out.is_contiguous() else out.contiguous()


def _cusparselt_mm(a: Tensor, b: Tensor, select: bool, square: bool, relu: bool = False,
                   transpose_out: bool = False, strided_k: bool = False) -> Tensor:
    from fvcompile.kernels.sparse24_cslt import cslt_pack_triton

    # One pass over `a` (a transposed view is read in place): relu, select, square, pack.
    return _cslt_mm(cslt_pack_triton(a, square=square, relu=relu, strided_k=strided_k), b, a.shape[0], transpose_out)


def _cusparselt_compress_mm(a: Tensor, b: Tensor, select: bool, square: bool, relu: bool = False,
                            transpose_out: bool = False) -> Tensor:
    # cuSPARSELt's own compress keeps whatever 2 of 4 it finds: an `a` that is not 2:4 yet (the
    # token-wise selection of the weight gradient) is selected first.
    m = a.shape[0]
    if relu:
        a = torch.relu(a)
    if select or relu:
        a = sparse24_select_triton(a)
    if square:
        a = _squared(a)
    a = torch.nn.functional.pad(a, (0, 0, 0, (-m) % 16)).contiguous()
    return _cslt_mm(torch._cslt_compress(a), b, m, transpose_out)


_SPARSE_MM = {"cutlass": _cutlass_mm, "cusparselt": _cusparselt_mm, "cusparselt-compress": _cusparselt_compress_mm}


# ---------------------------------------------------------------------------------------------
# Dense warm-up schedules
# ---------------------------------------------------------------------------------------------

_STEPS: dict[str, int] = {}  # schedule key -> training steps counted so far in this process


def _in_dense_warmup(schedule: str, dense_steps: int, count_step: bool) -> bool:
    """Whether an op of this schedule runs dense now.

    The counting op (a site's relu in a training graph) opens step `i` = steps counted so far and
    counts it. Every other op of the key (that site's matmuls, forward and backward, and its ops in
    inference graphs) belongs to the last counted step, or to step 0 before any. Step i is dense
    while i < dense_steps.
    """
    if not schedule or dense_steps <= 0:
        return False
    if count_step:
        step = _STEPS.get(schedule, 0)
        _STEPS[schedule] = step + 1
    else:
        step = max(_STEPS.get(schedule, 0) - 1, 0)
    return step < dense_steps


def warmup_steps_counted(schedule: str) -> int:
    """How many training steps the schedule `schedule` has counted in this process."""
    return _STEPS.get(schedule, 0)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fvcompile::sparse24_relu", mutates_args=())
def sparse24_relu(h: Tensor, schedule: str = "", dense_steps: int = 0, count_step: bool = False) -> Tensor:
    """relu(h), keeping the 2 largest of every 4 along the last dim (dense during a warm-up)."""
    if _in_dense_warmup(schedule, dense_steps, count_step):
        return torch.relu(h).contiguous()
    if _use_triton(h):
        return sparse24_relu_triton(h)
    return sparse24_relu_reference(h)


@sparse24_relu.register_fake
def _(h, schedule="", dense_steps=0, count_step=False):
    return h.new_empty(h.shape)


def _sparse24_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _sparse24_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return grad * (out > 0), None, None, None


sparse24_relu.register_autograd(_sparse24_relu_backward, setup_context=_sparse24_relu_setup)


@torch.library.custom_op("fvcompile::sparse24_relu_max", mutates_args=())
def sparse24_relu_max(h: Tensor, schedule: str = "", dense_steps: int = 0,
                      count_step: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`sparse24_relu`, and the largest value of its output's every row and every column (h
    flattened to 2-D; fp32) from the same pass: the FP8 scales of the forward matmul, which reads
    the rows, and of the sparse dW2, which reads the columns (no pass over r of their own)."""
    if _in_dense_warmup(schedule, dense_steps, count_step):
        r = torch.relu(h).contiguous()
        return (r, *row_col_max(r))
    if _use_triton(h):
        return sparse24_relu_max_triton(h)
    return sparse24_relu_max_reference(h)


@sparse24_relu_max.register_fake
def _(h, schedule="", dense_steps=0, count_step=False):
    k = h.shape[-1]
    return (h.new_empty(h.shape), h.new_empty((h.numel() // k,), dtype=torch.float32),
            h.new_empty((k,), dtype=torch.float32))


def _sparse24_relu_max_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.mark_non_differentiable(output[1], output[2])


def _sparse24_relu_max_backward(ctx, grad, _grad_rows, _grad_cols):
    return _sparse24_relu_backward(ctx, grad)  # the maxima are not differentiable


sparse24_relu_max.register_autograd(_sparse24_relu_max_backward, setup_context=_sparse24_relu_max_setup)


def sparse_mm_applies(a: Tensor, b: Tensor) -> bool:
    """Whether sparse24_mm(a, b) runs on sparse tensor cores (else it is emulated)."""
    return (
        a.dtype in PACK_DTYPES and b.dtype == a.dtype and a.shape[1] % ALIGN_K == 0
        and sparse_tensor_cores_available(a.device)
    )


@torch.library.custom_op("fvcompile::sparse24_mm", mutates_args=())
def sparse24_mm(a: Tensor, b: Tensor, schedule: str = "", dense_steps: int = 0, select: bool = True,
                square: bool = False, relu: bool = False, transpose_out: bool = False, fp8: bool = False,
                strided_k: bool = False, dense_rows: float = 0.0, a_max: Tensor | None = None) -> Tensor:
    """mask24(a) @ b for a (M, K) and a dense b (K, N); with square=True, mask24(a)² @ b.

    select=False is the caller's promise that `a` already is 2:4 along K (the forward's sparse relu,
    the backward's dH); the emulation then skips the selection (mask24(a) == a). square=True lets
    the forward pass the sparse relu r itself for relu(h)² = r², so that r² is never written out;
    relu=True takes h itself (mask24(relu(h))[²] @ b: relu, 2:4, square and pack in one pass).
    transpose_out=True returns the product transposed, (N, M) and contiguous: a weight gradient
    computed as (Aᵀ-side sparse) @ dY comes out in the weight's own layout, with no transposing copy.
    fp8=True multiplies in float8_e4m3fn, `a` scaled per row and b per tensor (kernels/sparse24_fp8.py).
    strided_k=True groups K in fours strided, not consecutively (`sparse24_cslt.strided_order`): for
    a weight gradient, whose K is the tokens, neighbouring tokens then do not compete. K is padded
    with zeros to a multiple of 64 first, on every device, so any token count runs sparse.
    dense_rows=f: the ceil(f·M) rows of `a` with the most nonzeros are multiplied whole, not 2:4
    (for a weight gradient, whose rows are features: the densest features stay dense).
    a_max: the largest |value| of every row of the operand before squaring (of relu(a) where
    relu=True; fp32, (M,)), where the caller has it from an earlier pass (`sparse24_relu_max`):
    FP8 then scales with it instead of reading `a` once more (the same scale: a row's largest
    value is always kept by the 2:4 selection).
    """
    out = _sparse24_mm(a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k, a_max)
    if dense_rows and not _in_dense_warmup(schedule, dense_steps, count_step=False):
        rows = densest_rows(torch.relu(a) if relu else a, dense_rows)
        kept = torch.relu(a[rows]) if relu else a[rows]
        fix = (_squared(kept) if square else kept) @ b  # a small dense matmul: f·M rows
        if transpose_out:
            out[:, rows] = fix.t()
        else:
            out[rows] = fix
    return out if out.is_contiguous() else out.contiguous()


def densest_rows(a: Tensor, fraction: float) -> Tensor:
    """The indices of the ceil(fraction·M) rows of `a` with the most nonzeros."""
    # count_nonzero: one pass over `a`, where (a != 0).sum(1) writes a boolean temporary first.
    return torch.count_nonzero(a, dim=1).topk(math.ceil(fraction * a.shape[0])).indices


def _sparse24_mm(a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k,
                 a_max=None) -> Tensor:
    if _in_dense_warmup(schedule, dense_steps, count_step=False):
        a = torch.relu(a) if relu else a
        out = (_squared(a) if square else a) @ b  # during the warm-up `a` is dense
        return out.t() if transpose_out else out
    # Whether our cuSPARSELt pack runs this call (a strided K is padded: any token count fits).
    cslt_pack = (a.dtype in PACK_DTYPES and b.dtype == a.dtype and (strided_k or a.shape[1] % ALIGN_K == 0)
                 and sparse_mm_backend(a.device) == "cusparselt" and (not fp8 or fp8_sparse_mm_available(a.device)))
    if strided_k:  # K padded with zeros and reordered on both sides: the product is the same
        from fvcompile.kernels.sparse24_cslt import to_strided_k

        b = to_strided_k(b, 0)  # a gather of its rows
        if not cslt_pack:  # elsewhere `a` is copied in that order; our cuSPARSELt pack reads it in place
            a = to_strided_k(a, 1)
            strided_k = False
    if fp8:
        from fvcompile.kernels import sparse24_fp8

        if not cslt_pack:  # emulated
            return sparse24_fp8.fp8_mm_reference(a, b, select, square, relu, transpose_out, a_max)
        # Without a transposed FP8 result on this GPU, the product is transposed by a copy.
        native = not transpose_out or fp8_sparse_mm_available(a.device, transposed=True)
        out = sparse24_fp8.fp8_mm_cusparselt(a, b, select, square, relu, transpose_out and native, strided_k,
                                             a_max, fp8_scales_in_matmul(a.device))
        return out if native else out.t()
    if cslt_pack:
        return _cusparselt_mm(a, b, select, square, relu, transpose_out, strided_k)
    if sparse_mm_applies(a, b):
        return _SPARSE_MM[sparse_mm_backend(a.device)](a, b, select, square, relu, transpose_out)
    if relu:
        a = torch.relu(a)
    a = sparse24_mask_reference(a) if select or relu else a
    out = (_squared(a) if square else a) @ b  # emulated
    return out.t() if transpose_out else out


@sparse24_mm.register_fake
def _(a, b, schedule="", dense_steps=0, select=True, square=False, relu=False, transpose_out=False, fp8=False,
      strided_k=False, dense_rows=0.0, a_max=None):
    return a.new_empty((b.shape[1], a.shape[0]) if transpose_out else (a.shape[0], b.shape[1]))


def _sparse24_mm_setup(ctx, inputs, output):
    a, b, schedule, dense_steps, select, square, relu, transpose_out, fp8, strided_k, dense_rows, _a_max = inputs
    dense = _in_dense_warmup(schedule, dense_steps, count_step=False)  # the forward's decision
    a_in = torch.relu(a) if relu else a
    keep = torch.ones_like(a, dtype=torch.bool)
    if (select or relu) and not dense:
        if strided_k:  # selected in the (padded) strided order, put back in a's
            from fvcompile.kernels.sparse24_cslt import from_strided_k, to_strided_k

            keep = from_strided_k(mask24(to_strided_k(a_in, 1).abs()), a.shape[1])
        else:
            keep = mask24(a_in.abs())
        if dense_rows:
            keep[densest_rows(a_in, dense_rows)] = True
    if relu:
        keep = keep & (a > 0)  # relu's own gradient
    ctx.square, ctx.transpose_out = square, transpose_out
    ctx.save_for_backward(keep, torch.where(keep, a_in, 0), b)


def _sparse24_mm_backward(ctx, grad):
    keep, a_kept, b = ctx.saved_tensors
    if ctx.transpose_out:
        grad = grad.t()
    grad_a = (grad @ b.t()) * keep
    if ctx.square:  # d(a²)/da = 2a
        grad_a, a_kept = 2 * a_kept * grad_a, _squared(a_kept)
    return grad_a, a_kept.t() @ grad, None, None, None, None, None, None, None, None, None, None


sparse24_mm.register_autograd(_sparse24_mm_backward, setup_context=_sparse24_mm_setup)
