"""2:4 selection + packing straight into cuSPARSELt's compressed format (Hopper), in one pass.

`torch._cslt_compress` turns a 2:4 tensor into the operand of `torch._cslt_sparse_mm`, but runs
far below memory speed, slower than the sparse matmul it feeds. This kernel selects (2 largest
magnitudes of every 4 along the last dim; optionally of relu(x), and optionally squaring the kept
values: relu(h)² straight from h) and writes the same bytes in one pass at memory speed, reading
strided inputs (a transposed view) in place.

The format, as `torch._cslt_compress` writes it for 16-bit types on sm90 (measured with
bench/cslt_layout_probe.py; the probe's outputs are the test fixture tests/kernels/data/):

- a tensor (M_pad, K/2 + K/16) of the input dtype, M_pad = M rounded up to 64; only its flat
  storage matters: first the kept values, row-major (M_pad, K/2), the two of each group in index
  order; then the metadata, M_pad * K / 8 bytes, 4 bits per group (first index | second << 2).
- metadata bytes come in 64-byte tiles of 16 rows x 32 columns (8 groups), stored band by band:
  tile (r, c) of the band of 64 rows starts at byte (r // 64) * 8K + (c // 32) * 256 +
  ((r % 64) // 16) * 64. In a tile, row i (0..15) and group j (0..7) are the nibble
  (i // 8) of byte 8 * (i % 8) + 2 * (j % 4) + j // 4.

For 8-bit types (FP8 e4m3; recorded on an H200 the same way) the values come first the same
way, and the metadata, still M_pad * K / 8 bytes in bands of 64 rows, comes in 128-byte tiles of
16 rows x 64 columns (16 groups; the 8-bit sparse MMA reads 64 columns): tile (r, c) starts at
byte (r // 64) * 8K + (c // 64) * 512 + ((r % 64) // 16) * 128. In a tile, row i and group j are
the nibble j % 2 of byte 16 * (i % 8) + i // 8 + 2 * bit3(j) + 4 * bit1(j) + 8 * bit2(j). The
tensor is (M_pad, K/2 + K/8) of the 8-bit type, and K must be a multiple of 64.

That is cuSPARSELt's layout on Hopper (with the cuSPARSELt of torch 2.11 + CUDA 13); other GPUs
may differ, which is why `sparse24_backends.sparse_mm_backend` uses it only after a probe matmul
through it matches the dense product, and falls back to `torch._cslt_compress` otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import mask24, triton, unit_stride_dim

ALIGN_M = 64  # metadata is written in bands of 64 rows


def padded_rows(m):
    return (m + ALIGN_M - 1) // ALIGN_M * ALIGN_M


def compressed_shape(m, k, element_size: int = 2) -> tuple:
    """(rows, columns) of the compressed tensor, in elements of `element_size` bytes."""
    return (padded_rows(m), k // 2 + k // (8 * element_size))


def align_k(element_size: int) -> int:
    """The multiple of K a layout's metadata tiles need: 32 for 16-bit types, 64 for 8-bit."""
    return 32 if element_size == 2 else 64


def _meta_byte_offsets(m_pad: int, k: int, device, element_size: int = 2) -> tuple[Tensor, Tensor]:
    """For every group (row, group index): its metadata byte (from the metadata's start) and nibble."""
    r = torch.arange(m_pad, device=device)[:, None]
    g = torch.arange(k // 4, device=device)[None, :]
    if element_size == 1:
        byte = ((r // 64) * 8 * k + (g // 16) * 512 + ((r % 64) // 16) * 128 + 16 * (r % 8) + (r % 16) // 8
                + 2 * ((g >> 3) & 1) + 4 * ((g >> 1) & 1) + 8 * ((g >> 2) & 1))
        return byte, (g & 1).expand_as(byte)
    j = g % 8
    byte = ((r // 64) * 8 * k + (g // 8) * 256 + ((r % 64) // 16) * 64
            + 8 * (r % 8) + 2 * (j % 4) + j // 4)
    return byte, (r % 16) // 8


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _to_out_dtype(values: Tensor, out_dtype: torch.dtype, scale: Tensor | None) -> Tensor:
    """fp32 values as stored: divided by the per-row `scale` for 8-bit types (saturated at the
    type's largest finite value), else rounded once."""
    if out_dtype.itemsize == 1:
        if scale is not None:
            values = values / scale.float().reshape(-1, *([1] * (values.dim() - 1)))
        return values.clamp(-FP8_MAX, FP8_MAX).to(out_dtype)
    return values.to(out_dtype)


STRIDED_ALIGN = 64  # a strided grouping pads K with zeros to this multiple first (the matmul's alignment)


def strided_k_padded(k: int) -> int:
    return -(-k // STRIDED_ALIGN) * STRIDED_ALIGN


def strided_order(k: int, device=None) -> Tensor:
    """The K order of a strided 2:4 grouping: group g holds columns g, g + K/4, g + K/2, g + 3K/4
    (for a weight gradient, whose K is the tokens: tokens from different sequences, not
    neighbours, compete; bench/diag/sparse24_backward_study.py). Position i holds column order[i].
    Callers pad K to a multiple of 64 first (`strided_k_padded`)."""
    if k % 4:
        raise ValueError(f"strided_order needs K in fours, got {k}: pad it with strided_k_padded(K) first")
    return torch.arange(k, device=device).view(4, k // 4).t().reshape(-1)


def to_strided_k(x: Tensor, dim: int) -> Tensor:
    """x with its K dim (`dim`: 1 for the sparse operand's columns, 0 for the dense operand's rows)
    padded with zeros to `strided_k_padded(K)` and put in `strided_order`: a product over K is
    unchanged when both operands go through this."""
    k = x.shape[dim]
    k_pad = strided_k_padded(k)
    # One copy (padding first would copy twice): padding's places read row k - 1, then are zeroed.
    out = x.index_select(dim, strided_order(k_pad, x.device).clamp_max(k - 1))
    if k_pad > k:  # where the padding rows k..k_pad-1 sit: the inverse of strided_order
        pad = torch.arange(k, k_pad, device=x.device)
        out.index_fill_(dim, 4 * (pad % (k_pad // 4)) + pad // (k_pad // 4), 0)
    return out


def from_strided_k(x: Tensor, k: int) -> Tensor:
    """The inverse of `to_strided_k(·, 1)`: x's columns put back in their own order, the padding dropped."""
    order = strided_order(x.shape[1], x.device)
    return torch.empty_like(x).index_copy_(1, order, x)[:, :k]


def cslt_pack_reference(x: Tensor, square: bool = False, relu: bool = False, out_dtype: torch.dtype | None = None,
                        scale: Tensor | None = None, strided_k: bool = False) -> Tensor:
    """Plain PyTorch: keep the 2 largest |x| of every 4 (ties: lower index), pack like cuSPARSELt.

    relu: relu(x) first (then "largest" and "largest magnitude" agree); square: pack the kept
    values squared (squared in fp32, rounded once). out_dtype: the packed type (x's by default);
    an 8-bit type (float8_e4m3fn) stores value / scale[row] (scale: (M,) fp32, or None for 1).
    strided_k: pad K with zero columns to a multiple of 64 (any token count fits), then select and
    pack x[:, strided_order(K_pad)] (the dense operand's rows go in that order, padded the same).
    """
    m, k = x.shape
    out_dtype = out_dtype or x.dtype
    if strided_k:
        x = to_strided_k(x, 1)
        k = x.shape[1]
    if relu:
        x = torch.relu(x)
    m_pad = padded_rows(m)
    x = torch.nn.functional.pad(x, (0, 0, 0, m_pad - m))
    if scale is not None:
        scale = torch.nn.functional.pad(scale.float().reshape(-1), (0, m_pad - m), value=1.0)
    keep = mask24(x.abs()).view(m_pad, k // 4, 4)
    order = torch.where(keep, torch.arange(4, device=x.device), 4).sort(-1).values[..., :2]  # the 2 kept
    values = x.view(m_pad, k // 4, 4).gather(-1, order).float()
    values = _to_out_dtype(values ** 2 if square else values, out_dtype, scale)
    codes = order[..., 0] | (order[..., 1] << 2)
    byte, nibble = _meta_byte_offsets(m_pad, k, x.device, out_dtype.itemsize)
    meta = torch.zeros(m_pad * k // 8, dtype=torch.int64, device=x.device)
    meta.index_put_((byte.expand_as(codes).reshape(-1),), (codes << (4 * nibble)).reshape(-1), accumulate=True)
    out = torch.empty(compressed_shape(m, k, out_dtype.itemsize), dtype=out_dtype, device=x.device)
    flat = out.view(-1).view(torch.uint8)
    values_bytes = m_pad * k // 2 * out_dtype.itemsize
    flat[:values_bytes] = values.reshape(-1).view(torch.uint8)
    flat[values_bytes:] = meta.to(torch.uint8)
    return out


def cslt_unpack_reference(compressed: Tensor, rows: int, k: int) -> Tensor:
    """The dense (rows, k) tensor a compressed operand stands for (for tests)."""
    m_pad = padded_rows(rows)
    size = compressed.element_size()
    flat = compressed.reshape(-1).view(torch.uint8)
    values = flat[: m_pad * k // 2 * size].view(compressed.dtype).view(m_pad, k // 4, 2)
    byte, nibble = _meta_byte_offsets(m_pad, k, compressed.device, size)
    codes = (flat[m_pad * k // 2 * size:].to(torch.int64)[byte] >> (4 * nibble)) & 15
    dense = torch.zeros(m_pad, k // 4, 4, dtype=compressed.dtype, device=compressed.device)
    dense.view(torch.uint8 if size == 1 else torch.int16).scatter_(
        -1, torch.stack([codes & 3, codes >> 2], -1), values.view(torch.uint8 if size == 1 else torch.int16))
    return dense.view(m_pad, k)[:rows]


def cslt_sparse_mm_reference(compressed: Tensor, b: Tensor, bias=None, alpha: Tensor | None = None, out_dtype=None,
                             transpose_result: bool = False, **plan) -> Tensor:
    """`torch._cslt_sparse_mm` on our layout in plain PyTorch (the tests' stand-in for the CUDA-only
    op, with its signature): the unpacked operand (all M_pad rows) times b in fp32, row i times
    alpha[i] where an alpha vector is given, rounded once to out_dtype (b's dtype by default)."""
    assert bias is None, "the stand-in has no bias"
    out = cslt_unpack_reference(compressed, compressed.shape[0], b.shape[0]).float() @ b.float()
    if alpha is not None:
        assert alpha.dtype == torch.float32 and alpha.shape == (out.shape[0],), "one fp32 alpha per row of M_pad"
        out = out * alpha[:, None]
    out = out.to(out_dtype or b.dtype)
    return out.t().contiguous() if transpose_result else out


if triton is not None:
    import triton.language as tl

    from fvcompile.kernels.sparse24 import keep_top2, pick, split4

    @triton.jit
    def _store_metadata(meta_ptr, codes, M_pad, K, OUT8: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr):
        # codes (BLOCK_M, BLOCK_K // 4): each group's 4-bit code, written in cuSPARSELt's metadata
        # layout (module docstring) for this program's tile.
        G: tl.constexpr = BLOCK_K // 4
        if OUT8:  # groups 2j and 2j + 1 of a row share a byte (low and high nibble)
            pairs = tl.reshape(codes, (BLOCK_M, G // 2, 2))
            byte = tl.sum(pairs << (tl.arange(0, 2) * 4)[None, None, :], axis=2)  # (BLOCK_M, G // 2)
            r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
            g = tl.program_id(1) * G + tl.arange(0, G // 2)[None, :] * 2
            offset = ((r // 64) * 8 * K + (g // 16) * 512 + ((r % 64) // 16) * 128 + 16 * (r % 8)
                      + (r % 16) // 8 + 2 * ((g >> 3) & 1) + 4 * ((g >> 1) & 1) + 8 * ((g >> 2) & 1))
            tl.store(meta_ptr + offset, byte.to(tl.uint8), mask=(r < M_pad) & (g < K // 4))
        else:  # rows i and i + 8 of each 16-row tile share a byte (low and high nibble)
            quads = tl.reshape(codes, (BLOCK_M // 16, 2, 8, G))
            byte = tl.sum(quads << (tl.arange(0, 2) * 4)[None, :, None, None], axis=1)  # (BLOCK_M // 16, 8, G)
            r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M // 16)[:, None, None] * 16
                 + tl.arange(0, 8)[None, :, None]).to(tl.int64)
            g = tl.program_id(1) * G + tl.arange(0, G)[None, None, :]
            j = g % 8
            offset = ((r // 64) * 8 * K + (g // 8) * 256 + ((r % 64) // 16) * 64
                      + 8 * (r % 8) + 2 * (j % 4) + j // 4)
            tl.store(meta_ptr + offset, byte.to(tl.uint8), mask=(r < M_pad) & (g < K // 4))

    @triton.jit
    def _cslt_pack_kernel(x_ptr, values_ptr, meta_ptr, scale_ptr, M, M_pad, K, K_IN, stride_xm, stride_xk,
                          RELU: tl.constexpr, SQUARE: tl.constexpr, OUT8: tl.constexpr, HAS_SCALE: tl.constexpr,
                          STRIDED_K: tl.constexpr, UNIT_STRIDE_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # One (BLOCK_M, BLOCK_K) tile: BLOCK_M a multiple of 16, BLOCK_K of 32 (16-bit output) or
        # 64 (8-bit output): whole metadata tiles. K is the packed width, K_IN <= K the input's
        # (a strided grouping pads K: columns K_IN.. read as zeros).
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        src = (cols % 4) * (K // 4) + cols // 4 if STRIDED_K else cols  # see strided_order
        load_mask = (rows[:, None] < M) & (src[None, :] < K_IN)  # rows >= M, columns >= K_IN: zeros
        stride_m = 1 if UNIT_STRIDE_DIM == 0 else stride_xm  # a unit stride the compiler knows:
        stride_k = 1 if UNIT_STRIDE_DIM == 1 else stride_xk  # vector loads (unit_stride_dim)
        x = tl.load(x_ptr + rows[:, None] * stride_m + src[None, :] * stride_k, mask=load_mask, other=0.0)
        x = x.to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
        x0, x1, x2, x3 = split4(x, BLOCK_M, BLOCK_K)
        k0, k1, k2, k3 = keep_top2(tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3))
        # Exactly 2 are kept: the first is at 0, 1 or 2, the second at 1, 2 or 3.
        idx0 = tl.where(k0, 0, tl.where(k1, 1, 2))
        idx1 = tl.where(k3, 3, tl.where(k2, 2, 1))
        v0 = pick(idx0, x0, x1, x2, x3)
        v1 = pick(idx1, x0, x1, x2, x3)
        if SQUARE:
            v0 = v0 * v0
            v1 = v1 * v1
        values = tl.reshape(tl.join(v0, v1), (BLOCK_M, BLOCK_K // 2))
        if OUT8:  # value / scale[row], saturated: float8_e4m3fn has no infinity
            if HAS_SCALE:
                # IEEE division (a plain / is approximate on GPUs): the bytes equal the reference's.
                scale = tl.load(scale_ptr + rows, mask=rows < M, other=1.0)
                values = tl.math.div_rn(values, tl.broadcast_to(scale[:, None], (BLOCK_M, BLOCK_K // 2)))
            values = tl.minimum(tl.maximum(values, -448.0), 448.0)
        values = values.to(values_ptr.dtype.element_ty)
        half_cols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(values_ptr + rows[:, None] * (K // 2) + half_cols[None, :], values,
                 mask=(rows[:, None] < M_pad) & (half_cols[None, :] < K // 2))

        _store_metadata(meta_ptr, idx0 | (idx1 << 2), M_pad, K, OUT8, BLOCK_M, BLOCK_K)


def cslt_pack_triton(x: Tensor, square: bool = False, relu: bool = False, out_dtype: torch.dtype | None = None,
                     scale: Tensor | None = None, strided_k: bool = False, block_m: int = 16,
                     block_k: int = 256) -> Tensor:
    """The Triton kernel of `cslt_pack_reference` (x 2-D, fp16/bf16, any strides; K a multiple of
    32, or of 64 for an 8-bit out_dtype)."""
    if triton is None:
        raise RuntimeError("the sparse24 Triton kernels need the `triton` package")
    m, k_in = x.shape
    k = strided_k_padded(k_in) if strided_k else k_in
    out_dtype = out_dtype or x.dtype
    size = out_dtype.itemsize
    if k % align_k(size):
        raise ValueError(f"cuSPARSELt packing into {out_dtype} needs the last dim to be a multiple of "
                         f"{align_k(size)}, got {k}")
    out = torch.empty(compressed_shape(m, k, size), dtype=out_dtype, device=x.device)
    flat = out.view(-1)
    m_pad = out.shape[0]
    meta = flat[m_pad * k // 2:].view(torch.uint8)
    scale_arg = scale.float().contiguous() if scale is not None else flat  # flat: a placeholder pointer
    grid = (triton.cdiv(m_pad, block_m), triton.cdiv(k, block_k))
    _cslt_pack_kernel[grid](x, flat, meta, scale_arg, m, m_pad, k, k_in, x.stride(0), x.stride(1),
                            RELU=relu, SQUARE=square, OUT8=size == 1, HAS_SCALE=scale is not None, STRIDED_K=strided_k,
                            UNIT_STRIDE_DIM=unit_stride_dim(x), BLOCK_M=block_m, BLOCK_K=block_k)
    return out
