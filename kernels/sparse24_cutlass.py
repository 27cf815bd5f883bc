"""2:4 packing in CUTLASS's layout: what `torch._sparse_semi_structured_mm` reads, on sm8x GPUs.

The sparse matmul backend "cutlass" of `kernels/sparse24_backends.py` (PyTorch's CUTLASS kernel
runs on sm8x only; Hopper takes cuSPARSELt's layout, `kernels/sparse24_cslt.py`). Its op:
`sparse24_pack(x) -> (values, meta)`, x with the 2 largest magnitudes of every 4 kept, packed (exact
for a tensor that already is 2:4); `relu2_sparse24_pack` (kernels/relu2_sparse24_pack.py) fuses
relu and square into the same kernel.

The Triton kernel is checked against PyTorch's own conversion,
`torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass`
(`pack_reference`), which is also the CPU path.

Packed format (CUTLASS, fp16/bf16): `values` is (M_pad, K/2), the two kept values of each group
in index order; `meta` is (M_pad, K/16) int16, one 4-bit code per group (2 bits per kept index,
lowest group in the lowest nibble), then reordered into CUTLASS's interleaved column-major layout
(`torch.sparse._semi_structured_conversions`). The reordering works on blocks of 32 rows, so
M is padded with zero rows to M_pad = ceil(M / 32) * 32: callers slice the matmul's output back to
M rows. K must be a multiple of 32 (one int16 metadata word per 16 columns, and the layout swaps
words in 2x2 blocks); the sparse matmul needs K % 64 == 0 (`ALIGN_K`), so a pass leaves hidden
widths that are not multiples of 64 dense.
fp32 is not packed: CUTLASS stores fp32 as 1:2 sparsity, which 2:4 does not fit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import (PACK_DTYPES, need_triton, pad_cols, sparse24_mask_reference, squared, triton,
                                        unit_stride_dim, use_triton)

ALIGN_M = 32  # metadata is reordered in blocks of 32 rows: M is padded to this


def padded_rows(m):
    """Rows after padding to ALIGN_M (works on SymInts)."""
    return (m + ALIGN_M - 1) // ALIGN_M * ALIGN_M


def pack_reference(dense24: Tensor) -> tuple[Tensor, Tensor]:
    """Pack a 2-D tensor that is already 2:4 with PyTorch's own CUTLASS conversion (rows padded)."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    m = dense24.shape[0]
    padded = torch.nn.functional.pad(dense24, (0, 0, 0, padded_rows(m) - m))
    return sparse_semi_structured_from_dense_cutlass(padded.contiguous())


def unpack_reference(values: Tensor, meta: Tensor, rows: int) -> Tensor:
    """The dense (rows, K) tensor a packed pair stands for."""
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

    return sparse_semi_structured_to_dense_cutlass(values, meta)[:rows]


def as_rows(x: Tensor) -> Tensor:
    """(..., K) -> (M, K) with unit stride along K."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_packable(x: Tensor) -> None:
    if x.dtype not in PACK_DTYPES:
        raise ValueError(f"2:4 packing needs fp16 or bf16, got {x.dtype} (CUTLASS packs fp32 as 1:2)")
    if x.shape[-1] % 32:
        raise ValueError(f"2:4 packing needs the last dim to be a multiple of 32, got {x.shape[-1]}")


if triton is not None:
    import triton.language as tl

    from fvcompile.kernels.sparse24 import keep_top2, pick, split4

    @triton.jit
    def _cutlass_indices(m0, m1, m3):
        # The two indices CUTLASS stores for a group with nonzero flags m0..m3 (int32 0/1): the
        # encoding of torch.sparse._semi_structured_conversions, which also fixes what a group with
        # fewer than 2 nonzeros stores, so our metadata is bit-identical to PyTorch's.
        nm0 = 1 - m0
        nm1 = 1 - m1
        expr0 = m0 & m1
        expr1 = nm0 & m1
        expr2 = nm0 & nm1
        idx0 = expr1 | (expr2 << 1)
        idx1 = (expr0 | expr2 | m3) | ((expr1 | nm1) << 1)
        return idx0, idx1

    @triton.jit
    def _cutlass_meta_offset(rows, cols, m_pad):
        # Where metadata word (row, col) lives in CUTLASS's ColumnMajorInterleaved<2> layout with
        # the row reordering and 2x2 swizzle of int16 metadata (blocks of 32 rows).
        r = rows[:, None]
        c = cols[None, :]
        dst_row = r // 32 * 32 + (r % 8) * 4 + (r % 32) // 8
        topright = ((dst_row % 2 == 0) & (c % 2 == 1)).to(tl.int64)
        bottomleft = ((dst_row % 2 == 1) & (c % 2 == 0)).to(tl.int64)
        dst_row = dst_row + topright - bottomleft
        dst_col = c - topright + bottomleft
        return (dst_col // 2) * m_pad * 2 + dst_row * 2 + dst_col % 2

    @triton.jit
    def _pack24_kernel(x_ptr, values_ptr, meta_ptr, M, M_pad, K, stride_xm, stride_xk,
                       RELU_SQUARE: tl.constexpr, UNIT_STRIDE_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # One coalesced (BLOCK_M, BLOCK_K) tile (BLOCK_K a multiple of 16: whole metadata words),
        # split into groups in registers, as in kernels/sparse24_cslt.py. x may be a strided view.
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        load_mask = (rows[:, None] < M) & (cols[None, :] < K)  # rows >= M are padding: zeros
        stride_m = 1 if UNIT_STRIDE_DIM == 0 else stride_xm  # a unit stride the compiler knows:
        stride_k = 1 if UNIT_STRIDE_DIM == 1 else stride_xk  # vector loads (unit_stride_dim)
        x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :] * stride_k, mask=load_mask, other=0.0)
        x = x.to(tl.float32)  # exact for fp16/bf16; the interpreter has no bf16 arithmetic
        if RELU_SQUARE:
            x = tl.maximum(x, 0.0)  # selected on relu(x); squaring keeps the order
        x0, x1, x2, x3 = split4(x, BLOCK_M, BLOCK_K)
        k0, k1, k2, k3 = keep_top2(tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3))
        if RELU_SQUARE:
            x0 = x0 * x0
            x1 = x1 * x1
            x2 = x2 * x2
            x3 = x3 * x3
        # The kept values as stored (rounded once to the output dtype), and which are nonzero:
        # CUTLASS's indices depend on the nonzeros (a group may keep fewer than 2).
        out_ty = values_ptr.dtype.element_ty
        w0 = tl.where(k0, x0, 0.0).to(out_ty).to(tl.float32)
        w1 = tl.where(k1, x1, 0.0).to(out_ty).to(tl.float32)
        w2 = tl.where(k2, x2, 0.0).to(out_ty).to(tl.float32)
        w3 = tl.where(k3, x3, 0.0).to(out_ty).to(tl.float32)
        idx0, idx1 = _cutlass_indices((w0 != 0).to(tl.int32), (w1 != 0).to(tl.int32), (w3 != 0).to(tl.int32))
        values = tl.reshape(tl.join(pick(idx0, w0, w1, w2, w3), pick(idx1, w0, w1, w2, w3)),
                            (BLOCK_M, BLOCK_K // 2)).to(out_ty)
        half_cols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(values_ptr + rows[:, None] * (K // 2) + half_cols[None, :], values,
                 mask=(rows[:, None] < M_pad) & (half_cols[None, :] < K // 2))
        # One int16 word per 4 groups (16 columns), lowest group in the lowest nibble.
        codes = tl.reshape(idx0 | (idx1 << 2), (BLOCK_M, BLOCK_K // 16, 4))
        word = tl.sum(codes << (tl.arange(0, 4) * 4)[None, None, :], axis=2)
        words = (tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)).to(tl.int64)
        tl.store(meta_ptr + _cutlass_meta_offset(rows, words, M_pad), word.to(tl.int16),
                 mask=(rows[:, None] < M_pad) & (words[None, :] < K // 16))


def _pack_triton(x: Tensor, relu_square: bool, block_m: int = 32, block_k: int = 128) -> tuple[Tensor, Tensor]:
    # 32 rows: a whole block of CUTLASS's metadata row permutation, written in 128-byte runs (a
    # 16-row tile fills every other 8 bytes of them). Not yet measured at these tiles: the parts
    # bench times four tile shapes.
    need_triton()
    check_packable(x)
    x = x.reshape(-1, x.shape[-1])  # a 2-D view stays a view, transposed or not
    m, k = x.shape
    m_pad = padded_rows(m)
    values = torch.empty((m_pad, k // 2), dtype=x.dtype, device=x.device)
    meta = torch.empty((m_pad, k // 16), dtype=torch.int16, device=x.device)
    grid = (triton.cdiv(m_pad, block_m), triton.cdiv(k, block_k))
    _pack24_kernel[grid](x, values, meta, m, m_pad, k, x.stride(0), x.stride(1),
                         RELU_SQUARE=relu_square, UNIT_STRIDE_DIM=unit_stride_dim(x), BLOCK_M=block_m,
                         BLOCK_K=block_k)
    return values, meta


def relu2_sparse24_pack_triton(h: Tensor, **blocks) -> tuple[Tensor, Tensor]:
    return _pack_triton(h, relu_square=True, **blocks)


def sparse24_pack_triton(x: Tensor, **blocks) -> tuple[Tensor, Tensor]:
    return _pack_triton(x, relu_square=False, **blocks)


def cutlass_mm(a: Tensor, b: Tensor, *, select: bool = True, square: bool = False, relu: bool = False,
               transpose_out: bool = False) -> Tensor:
    """mask24(relu(a)[²]) @ b (or its transpose) on sm8x: our CUTLASS-layout pack, which selects by
    magnitude as it packs (so `select` changes nothing), + `torch._sparse_semi_structured_mm`."""
    if relu:
        a = torch.relu(a)
    if square:
        a = squared(a)  # selecting on a or a² keeps the same values
    values, meta = sparse24_pack_triton(a)  # selects by magnitude as it packs: no extra pass
    out = torch._sparse_semi_structured_mm(values, meta, pad_cols(b, 8))[: a.shape[0], : b.shape[1]]
    return (out.t() if transpose_out else out).contiguous()


@torch.library.custom_op("fvcompile::sparse24_pack", mutates_args=())
def sparse24_pack(x: Tensor) -> tuple[Tensor, Tensor]:
    """x with the 2 largest magnitudes of every 4 kept, packed like `relu2_sparse24_pack`."""
    check_packable(x)
    if use_triton(x):
        return sparse24_pack_triton(x)
    return pack_reference(sparse24_mask_reference(as_rows(x)))


@sparse24_pack.register_fake
def pack_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    """The packed shapes: values (M_pad, K/2) in x's dtype, metadata (M_pad, K/16) int16."""
    k = x.shape[-1]
    m_pad = padded_rows(x.numel() // k)
    return x.new_empty((m_pad, k // 2)), x.new_empty((m_pad, k // 16), dtype=torch.int16)
