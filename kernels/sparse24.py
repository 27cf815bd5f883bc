"""2:4 activation sparsity: the selection, shared by every sparse24 op. Triton kernel and reference.

2:4 sparsity keeps the 2 largest of every group of 4 consecutive values along the last
(reduction) dimension and zeroes the other 2. Ties go to the lower index, identically in the
kernels and in the reference, so "which two" is a deterministic function of the input.

This module holds no op: `mask24` and the references (plain PyTorch: the CPU implementation and
the test oracle), the selection kernel (`sparse24_relu_triton`, `sparse24_relu_max_triton`,
`sparse24_select_triton`) and small helpers. The ops built on it are one per file:
`sparse24_relu`, `sparse24_relu_max`, `sparse24_mm`, `sparse24_weight_grad_mm` (kernels/), the
sparse matmul a GPU runs in kernels/sparse24_backends.py, the packs into each backend's layout in
kernels/sparse24_cutlass.py and kernels/sparse24_cslt.py, FP8 in kernels/sparse24_fp8.py.

On CPU the ops run the reference. The Triton kernels run on CUDA tensors and, for the tests, in
the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1` set before this module is imported);
the interpreter cannot run on the fake tensors of a compiled graph, so compiled CPU graphs always
take the reference path. The kernels compare and square in fp32, which is exact for fp16/bf16
inputs; the interpreter (not a GPU) rounds fp32 -> bf16 by truncation, which is why the bf16 relu²
packing test uses inputs whose squares are exact.
"""
from __future__ import annotations

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
    def keep_top2(s0, s1, s2, s3):
        # Keep a value when fewer than 2 of the others beat it; on a tie the lower index wins.
        k0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)) < 2
        k1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)) < 2
        k2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)) < 2
        k3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)) < 2
        return k0, k1, k2, k3

    @triton.jit
    def split4(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # (BLOCK_M, BLOCK_K) -> the 4 members of each group of 4 columns, each (BLOCK_M, BLOCK_K/4, 1).
        # [g, i, j] of the reshape is column 4g + 2i + j.
        even, odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 4, 2, 2)))  # j = 0, j = 1
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def join4(x0, x1, x2, x3, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # The inverse of split4.
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (BLOCK_M, BLOCK_K))

    @triton.jit
    def _select24_kernel(x_ptr, out_ptr, row_part_ptr, col_part_ptr, M, K, stride_xm, stride_xk, stride_out,
                         RELU: tl.constexpr, WITH_MAX: tl.constexpr, UNIT_STRIDE_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # RELU: keep the 2 largest of relu(x); else keep the 2 largest magnitudes of x. One
        # (BLOCK_M, BLOCK_K) tile per program, split into groups in registers. x may be a transposed
        # view (the weight gradient selects along tokens): the tile load reads it in place.
        # WITH_MAX: also the largest kept |value| of each of the tile's rows and columns, into
        # row_part (M, tiles along K) and col_part (tiles along M, K): the FP8 scales of both
        # matmuls that read the output, once reduced. Plain stores: atomic maxima (one per tile
        # and column) made this kernel several times slower.
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < M) & (cols[None, :] < K)  # K % 4 == 0: groups are all in or all out
        stride_m = 1 if UNIT_STRIDE_DIM == 0 else stride_xm  # a unit stride the compiler knows:
        stride_k = 1 if UNIT_STRIDE_DIM == 1 else stride_xk  # vector loads (unit_stride_dim)
        x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
            s0, s1, s2, s3 = split4(x, BLOCK_M, BLOCK_K)
        else:
            s0, s1, s2, s3 = split4(tl.abs(x), BLOCK_M, BLOCK_K)
        k0, k1, k2, k3 = keep_top2(s0, s1, s2, s3)
        keep = join4(k0.to(tl.int8), k1.to(tl.int8), k2.to(tl.int8), k3.to(tl.int8), BLOCK_M, BLOCK_K)
        out = tl.where(keep != 0, x, 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out, mask=mask)
        if WITH_MAX:
            kept = tl.abs(out.to(tl.float32))  # zero outside the tile's mask (loaded as 0)
            part_ty = row_part_ptr.dtype.element_ty
            tl.store(row_part_ptr + rows * tl.num_programs(1) + tl.program_id(1), tl.max(kept, 1).to(part_ty),
                     mask=rows < M)
            tl.store(col_part_ptr + tl.program_id(0) * K + cols, tl.max(kept, 0).to(part_ty), mask=cols < K)

    @triton.jit
    def pick(idx, w0, w1, w2, w3):
        return tl.where(idx == 0, w0, tl.where(idx == 1, w1, tl.where(idx == 2, w2, w3)))

def unit_stride_dim(x: Tensor) -> int:
    """The dim of 2-D x whose stride is 1 (1: rows contiguous; 0: a transposed view), or -1: for a
    kernel's constexpr, so that the compiler knows the unit stride and loads tiles as vectors
    (sm90 PTX of the cuSPARSELt pack: 4 16-byte loads per thread where 32 2-byte ones were)."""
    return 1 if x.stride(1) == 1 else 0 if x.stride(0) == 1 else -1


def need_triton() -> None:
    """Raise where Triton is missing (the references work without it)."""
    if triton is None:
        raise RuntimeError("the sparse24 Triton kernels need the `triton` package")


def _select_triton(h: Tensor, relu: bool, block_m: int, block_k: int, with_max: bool = False):
    need_triton()
    if h.shape[-1] % 4:
        raise ValueError(f"2:4 selection needs the last dim to be a multiple of 4, got {h.shape[-1]}")
    x = h.reshape(-1, h.shape[-1])  # a 2-D view stays a view, transposed or not
    out = torch.empty(x.shape, dtype=h.dtype, device=h.device)
    m, k = x.shape
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    # The tiles' maxima, in h's dtype (a maximum of its values is one of them: exact). Without
    # maxima the kernel never touches these: `out` is a placeholder pointer, no allocation.
    row_part, col_part = ((out.new_empty(m, grid[1]), out.new_empty(grid[0], k)) if with_max else (out, out))
    _select24_kernel[grid](x, out, row_part, col_part, m, k, x.stride(0), x.stride(1), out.stride(0), RELU=relu,
                           WITH_MAX=with_max, UNIT_STRIDE_DIM=unit_stride_dim(x), BLOCK_M=block_m, BLOCK_K=block_k)
    if with_max:
        return out.view(h.shape), row_part.amax(1).float(), col_part.amax(0).float()
    return out.view(h.shape)


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


def use_triton(t: Tensor) -> bool:
    """Whether an op runs its Triton kernel on `t` (a CUDA tensor; CPU takes the reference)."""
    return t.is_cuda and triton is not None


def pad_cols(b: Tensor, multiple: int) -> Tensor:
    """b with zero columns appended up to a multiple of `multiple`."""
    extra = (-b.shape[1]) % multiple
    return torch.nn.functional.pad(b, (0, extra)) if extra else b


def squared(x: Tensor) -> Tensor:
    """x², squared in (at least) fp32 and rounded once to x's dtype, as the kernels do."""
    return (x.to(torch.promote_types(x.dtype, torch.float32)) ** 2).to(x.dtype)
