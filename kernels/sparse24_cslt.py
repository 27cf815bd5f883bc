"""2:4 selection + packing straight into cuSPARSELt's compressed format (Hopper), in one pass.

`torch._cslt_compress` turns a 2:4 tensor into the operand of `torch._cslt_sparse_mm`, but on an
H100 it runs at ~80 GB/s: 6.7 ms for an 8192 x 21504 bf16 activation, 3.7x the sparse matmul it
feeds (bench/results, 2026-11-26). This kernel selects (2 largest magnitudes of every 4 along the
last dim; optionally of relu(x), and optionally squaring the kept values: relu(h)² straight from h)
and writes the same bytes at memory speed (0.20 ms there), reading strided inputs (a transposed
view) in place.

The format, as `torch._cslt_compress` writes it for 16-bit types on sm90 (measured with
bench/cslt_layout_probe.py; the probe's outputs are the test fixture tests/kernels/data/):

- a tensor (M_pad, K/2 + K/16) of the input dtype, M_pad = M rounded up to 64; only its flat
  storage matters: first the kept values, row-major (M_pad, K/2), the two of each group in index
  order; then the metadata, M_pad * K / 8 bytes, 4 bits per group (first index | second << 2).
- metadata bytes come in 64-byte tiles of 16 rows x 32 columns (8 groups), stored band by band:
  tile (r, c) of the band of 64 rows starts at byte (r // 64) * 8K + (c // 32) * 256 +
  ((r % 64) // 16) * 64. In a tile, row i (0..15) and group j (0..7) are the nibble
  (i // 8) of byte 8 * (i % 8) + 2 * (j % 4) + j // 4.

That is cuSPARSELt's layout on Hopper (with the cuSPARSELt of torch 2.11 + CUDA 13); other GPUs
may differ, which is why `sparse24.sparse_mm_backend` uses it only after a probe matmul through it
matches the dense product, and falls back to `torch._cslt_compress` otherwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fvcompile.kernels.sparse24 import mask24, triton

ALIGN_M = 64  # metadata is written in bands of 64 rows


def padded_rows(m):
    return (m + ALIGN_M - 1) // ALIGN_M * ALIGN_M


def compressed_shape(m, k) -> tuple:
    return (padded_rows(m), k // 2 + k // 16)


def _meta_byte_offsets(m_pad: int, k: int, device) -> tuple[Tensor, Tensor]:
    """For every group (row, group index): its metadata byte (from the metadata's start) and nibble."""
    r = torch.arange(m_pad, device=device)[:, None]
    g = torch.arange(k // 4, device=device)[None, :]
    j = g % 8
    byte = ((r // 64) * 8 * k + (g // 8) * 256 + ((r % 64) // 16) * 64
            + 8 * (r % 8) + 2 * (j % 4) + j // 4)
    return byte, (r % 16) // 8


def cslt_pack_reference(x: Tensor, square: bool = False, relu: bool = False) -> Tensor:
    """Plain PyTorch: keep the 2 largest |x| of every 4 (ties: lower index), pack like cuSPARSELt.

    relu: relu(x) first (then "largest" and "largest magnitude" agree); square: pack the kept
    values squared (squared in fp32, rounded once).
    """
    m, k = x.shape
    if relu:
        x = torch.relu(x)
    m_pad = padded_rows(m)
    x = torch.nn.functional.pad(x, (0, 0, 0, m_pad - m))
    keep = mask24(x.abs()).view(m_pad, k // 4, 4)
    order = torch.where(keep, torch.arange(4, device=x.device), 4).sort(-1).values[..., :2]  # the 2 kept
    values = x.view(m_pad, k // 4, 4).gather(-1, order)
    if square:
        values = (values.float() ** 2).to(x.dtype)
    codes = order[..., 0] | (order[..., 1] << 2)
    byte, nibble = _meta_byte_offsets(m_pad, k, x.device)
    meta = torch.zeros(m_pad * k // 8, dtype=torch.int64, device=x.device)
    meta.index_put_((byte.expand_as(codes).reshape(-1),), (codes << (4 * nibble)).reshape(-1), accumulate=True)
    out = torch.empty(compressed_shape(m, k), dtype=x.dtype, device=x.device)
    flat = out.view(-1).view(torch.uint8)
    flat[: m_pad * k] = values.reshape(-1).view(torch.uint8)
    flat[m_pad * k:] = meta.to(torch.uint8)
    return out


def cslt_unpack_reference(compressed: Tensor, rows: int, k: int) -> Tensor:
    """The dense (rows, k) tensor a compressed operand stands for (for tests)."""
    m_pad = padded_rows(rows)
    flat = compressed.reshape(-1).view(torch.uint8)
    values = flat[: m_pad * k].view(compressed.dtype).view(m_pad, k // 4, 2)
    byte, nibble = _meta_byte_offsets(m_pad, k, compressed.device)
    codes = (flat[m_pad * k:].to(torch.int64)[byte] >> (4 * nibble)) & 15
    dense = torch.zeros(m_pad, k // 4, 4, dtype=compressed.dtype, device=compressed.device)
    dense.scatter_(-1, torch.stack([codes & 3, codes >> 2], -1), values)
    return dense.view(m_pad, k)[:rows]


if triton is not None:
    import triton.language as tl

    from fvcompile.kernels.sparse24 import _keep_top2, _pick, _split4

    @triton.jit
    def _cslt_pack_kernel(x_ptr, values_ptr, meta_ptr, M, M_pad, K, stride_xm, stride_xk, RELU: tl.constexpr,
                          SQUARE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # One (BLOCK_M, BLOCK_K) tile: BLOCK_M a multiple of 16, BLOCK_K of 32 (whole metadata tiles).
        G: tl.constexpr = BLOCK_K // 4
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        load_mask = (rows[:, None] < M) & (cols[None, :] < K)  # rows >= M: zero padding
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=load_mask, other=0.0)
        x = x.to(tl.float32)
        if RELU:
            x = tl.maximum(x, 0.0)
        x0, x1, x2, x3 = _split4(x, BLOCK_M, BLOCK_K)
        k0, k1, k2, k3 = _keep_top2(tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3))
        # Exactly 2 are kept: the first is at 0, 1 or 2, the second at 1, 2 or 3.
        idx0 = tl.where(k0, 0, tl.where(k1, 1, 2))
        idx1 = tl.where(k3, 3, tl.where(k2, 2, 1))
        v0 = _pick(idx0, x0, x1, x2, x3)
        v1 = _pick(idx1, x0, x1, x2, x3)
        if SQUARE:
            v0 = v0 * v0
            v1 = v1 * v1
        values = tl.reshape(tl.join(v0, v1), (BLOCK_M, BLOCK_K // 2)).to(values_ptr.dtype.element_ty)
        half_cols = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        tl.store(values_ptr + rows[:, None] * (K // 2) + half_cols[None, :], values,
                 mask=(rows[:, None] < M_pad) & (half_cols[None, :] < K // 2))

        # Metadata: rows i and i + 8 of each 16-row tile share a byte (low and high nibble).
        codes = tl.reshape(idx0 | (idx1 << 2), (BLOCK_M // 16, 2, 8, G))
        shift = (tl.arange(0, 2) * 4)[None, :, None, None]
        byte = tl.sum(codes << shift, axis=1)  # (BLOCK_M // 16, 8, G)
        r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M // 16)[:, None, None] * 16
             + tl.arange(0, 8)[None, :, None]).to(tl.int64)
        g = tl.program_id(1) * G + tl.arange(0, G)[None, None, :]
        j = g % 8
        offset = ((r // 64) * 8 * K + (g // 8) * 256 + ((r % 64) // 16) * 64
                  + 8 * (r % 8) + 2 * (j % 4) + j // 4)
        tl.store(meta_ptr + offset, byte.to(tl.uint8), mask=(r < M_pad) & (g < K // 4))


def cslt_pack_triton(x: Tensor, square: bool = False, relu: bool = False, block_m: int = 16,
                     block_k: int = 256) -> Tensor:
    """The Triton kernel of `cslt_pack_reference` (x 2-D, fp16/bf16, any strides, K % 32 == 0)."""
    if triton is None:
        raise RuntimeError("the sparse24 Triton kernels need the `triton` package")
    m, k = x.shape
    if k % 32:
        raise ValueError(f"cuSPARSELt packing needs the last dim to be a multiple of 32, got {k}")
    out = torch.empty(compressed_shape(m, k), dtype=x.dtype, device=x.device)
    flat = out.view(-1)
    m_pad = out.shape[0]
    meta = flat[m_pad * k // 2:].view(torch.uint8)
    grid = (triton.cdiv(m_pad, block_m), triton.cdiv(k, block_k))
    _cslt_pack_kernel[grid](x, flat, meta, m, m_pad, k, x.stride(0), x.stride(1),
                            RELU=relu, SQUARE=square, BLOCK_M=block_m, BLOCK_K=block_k)
    return out
