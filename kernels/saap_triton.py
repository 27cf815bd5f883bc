"""SAAP attention's Triton kernels, prefill and decode: flash attention over only the key blocks
that SAAP's block lists name (kernels/saap_layout.py holds the layout and the lists).

Each program takes one block of queries of one query head (query head h reads KV head
h // (Hq // Hkv)) and runs flash attention, online softmax in fp32 (in base 2), over the key
blocks listed for that query block: the wholly read ones (`full_*`) without a mask, the
partially read ones (`kv_*`) with `slot_mask_mod`'s rule evaluated from `slot_pos`. Unlisted
blocks are never loaded, so the work follows the keys read, not the sequence length.

The keys reach a kernel in one of two forms:
- in slots (`gather_slots`): k and v copied into the slot order (B, Hkv, S, D), each key block
  contiguous;
- by position (`by_position=True`): k and v as the model has them (B, Hkv, Lk, D); each key
  block's rows are found through `slot_pos`. Nothing is copied, which decode needs: gathering
  the slots would read every key to attend to a few of them.

`saap_prefill`: grid (query blocks, B * Hq), one query block per program.
`saap_decode`: few queries (at most one query block, e.g. one new token), where B * Hq programs
cannot fill a GPU: each head's listed blocks are split in `splits` contiguous chunks (flash
decoding); each program writes its chunk's running max, sum and output in fp32, and a combine in
torch rescales and adds them.
`saap_attention_triton`: the entry, decode for at most `DECODE_QUERIES` queries, prefill otherwise.

`tl.dot` needs every dim >= 16: q_block and kv_block must be powers of 2 of at least 16, the head
dim at least 16 (padded to a power of 2 inside the kernel); decode pads its queries to 16 rows.
A query always reads itself, so no row is empty; a row with nothing read would still give zeros,
not NaN.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from fvcompile.kernels.saap_layout import SAAPBlocks

try:
    import triton
    import triton.language as tl
except ImportError:  # the layout and the reference work without Triton; only these kernels need it
    triton = None

DOT_MIN = 16  # tl.dot's smallest M, N and K
DECODE_QUERIES = 16  # saap_attention_triton decodes at most this many queries (one padded dot tile)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _attend(acc, m_i, l_i, q, q_pos, blk, k_base, v_base, pos_base, bits_rows, q_in, cluster_base, stride_kn,
                stride_kd, stride_vn, stride_vd, offs_n, offs_d, d_ok, band_len, sink, window, qk_scale,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, BY_POSITION: tl.constexpr, PRECISION: tl.constexpr):
        """Key block `blk` folded into the running output `acc`, max `m_i` and sum `l_i` of q
        (bits_rows: the pointers to each query's first probe word, q_in: which rows are queries)."""
        slots = blk * BLOCK_N + offs_n
        if MASKED or BY_POSITION:
            k_pos = tl.load(pos_base + slots)
        if BY_POSITION:
            rows = tl.maximum(k_pos, 0)  # padding (-1) reads key 0, masked below
        else:
            rows = slots
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:  # slot_mask_mod: causal, not padding, read in the band part xor the cluster part,
            # there only by the queries that probe the block's cluster
            cluster = tl.maximum(tl.load(cluster_base + blk), 0)
            word = tl.load(bits_rows + cluster // 32, mask=q_in, other=0)
            probes = ((word >> (cluster % 32)) & 1) == 1
            k_pos = k_pos[None, :]
            always = (k_pos < sink) | (q_pos[:, None] - k_pos < window)
            in_band = (slots < band_len)[None, :]
            read = (k_pos >= 0) & (k_pos <= q_pos[:, None]) & (always == in_band) & (in_band | probes[:, None])
            s = tl.where(read, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has read nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        return acc, m_new, l_i

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                        bits_ptr, cluster_ptr, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                        so_b, so_h, so_m, so_d, hq, hkv, lq, offset, slots, n_qb, n_kb, n_words, band_len, sink,
                        window, qk_scale, head_dim, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BY_POSITION: tl.constexpr, PRECISION: tl.constexpr):
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b, h = (bh // hq).to(tl.int64), bh % hq  # int64: a batch's offset can pass 2**31 at long lengths
        hk = h // (hq // hkv)
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_ok = (offs_m < lq)[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d, mask=q_ok, other=0.0)
        k_base = k_ptr + b * sk_b + hk * sk_h
        v_base = v_ptr + b * sv_b + hk * sv_h
        pos_base = pos_ptr + (b * hkv + hk) * slots
        cluster_base = cluster_ptr + (b * hkv + hk) * (slots // BLOCK_N)
        q_in = offs_m < lq
        bits_rows = bits_ptr + ((b * hq + h) * lq + offs_m) * n_words
        q_pos = offs_m + offset
        row = bh * n_qb + qb  # this query block's row of the (B, Hq, nQB) block lists
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in range(tl.load(full_num_ptr + row)):
            blk = tl.load(full_idx_ptr + row * n_kb + i)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, blk, k_base, v_base, pos_base, bits_rows, q_in,
                                    cluster_base, sk_n, sk_d, sv_n, sv_d,
                                    offs_n, offs_d, d_ok, band_len, sink, window, qk_scale, BLOCK_N, False,
                                    BY_POSITION, PRECISION)
        for i in range(tl.load(kv_num_ptr + row)):
            blk = tl.load(kv_idx_ptr + row * n_kb + i)
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, blk, k_base, v_base, pos_base, bits_rows, q_in,
                                    cluster_base, sk_n, sk_d, sv_n, sv_d,
                                    offs_n, offs_d, d_ok, band_len, sink, window, qk_scale, BLOCK_N, True,
                                    BY_POSITION, PRECISION)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :] * so_d,
                 out.to(o_ptr.dtype.element_ty), mask=q_ok)

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, kv_num_ptr, kv_idx_ptr, full_num_ptr, full_idx_ptr,
                       bits_ptr, cluster_ptr, m_ptr, l_ptr, acc_ptr, sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d,
                       sv_b, sv_h, sv_n, sv_d, hq, hkv, lq, offset, slots, n_qb, n_kb, n_words, band_len, sink,
                       window, qk_scale, head_dim,
                       SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BY_POSITION: tl.constexpr, PRECISION: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b, h = (bh // hq).to(tl.int64), bh % hq  # int64: a batch's offset can pass 2**31 at long lengths
        hk = h // (hq // hkv)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_ok = (offs_m < lq)[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d, mask=q_ok, other=0.0)
        k_base = k_ptr + b * sk_b + hk * sk_h
        v_base = v_ptr + b * sv_b + hk * sv_h
        pos_base = pos_ptr + (b * hkv + hk) * slots
        cluster_base = cluster_ptr + (b * hkv + hk) * (slots // BLOCK_N)
        q_in = offs_m < lq
        bits_rows = bits_ptr + ((b * hq + h) * lq + offs_m) * n_words
        q_pos = offs_m + offset
        row = bh * n_qb  # the one query block
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # The full blocks then the partial ones, as one list cut in SPLITS chunks; every block takes
        # the mask (it is true throughout a full block, and decode is bound by memory, not the mask).
        n_full = tl.load(full_num_ptr + row)
        total = n_full + tl.load(kv_num_ptr + row)
        chunk = tl.cdiv(total, SPLITS)
        for j in range(split * chunk, tl.minimum(split * chunk + chunk, total)):
            blk = (tl.load(full_idx_ptr + row * n_kb + j, mask=j < n_full, other=0)
                   + tl.load(kv_idx_ptr + row * n_kb + j - n_full, mask=j >= n_full, other=0))
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, blk, k_base, v_base, pos_base, bits_rows, q_in,
                                    cluster_base, sk_n, sk_d, sv_n, sv_d,
                                    offs_n, offs_d, d_ok, band_len, sink, window, qk_scale, BLOCK_N, True,
                                    BY_POSITION, PRECISION)
        part = (bh * SPLITS + split) * BLOCK_M + offs_m  # partials (B * Hq, SPLITS, BLOCK_M[, BLOCK_D])
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc)


def gather_slots(k: Tensor, v: Tensor, slot_pos: Tensor) -> tuple[Tensor, Tensor]:
    """k and v (B, Hkv, Lk, D) copied into the slots (B, Hkv, S, D) of `slot_pos` (B, Hkv, S);
    padding slots hold key 0 (the kernels mask them)."""
    if k.shape != v.shape or k.dim() != 4 or slot_pos.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must be (B, Hkv, Lk, D) and slot_pos (B, Hkv, S); got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, slot_pos {tuple(slot_pos.shape)}")
    index = slot_pos.clamp(min=0).long()[..., None].expand(-1, -1, -1, k.shape[-1])
    return k.gather(2, index), v.gather(2, index)


def saap_prefill(q: Tensor, k: Tensor, v: Tensor, blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int,
                 scale: float | None = None, by_position: bool = False) -> Tensor:
    """(B, Hq, Lq, D) in q's dtype: SAAP attention of q (B, Hq, Lq, D), the last Lq of Lk positions,
    one program per (query block, batch and query head).

    k, v: the keys and values in slots (B, Hkv, S, D) (`gather_slots`), or with by_position=True
    as they are (B, Hkv, Lk, D). scale None: 1 / sqrt(D), SDPA's."""
    qk_scale, block_d, precision = _check(q, k, v, blocks, lq=lq, lk=lk, sink=sink, window=window, scale=scale,
                                          by_position=by_position)
    b, hq, _, d = q.shape
    hkv, slots = blocks.slot_pos.shape[1:]
    n_qb, n_kb = blocks.kv_indices.shape[2:]
    out = torch.empty_like(q)
    _prefill_kernel[(n_qb, b * hq)](
        q, k, v, out, *_lists(blocks), *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hkv, lq, lk - lq, slots, n_qb, n_kb, blocks.probe_bits.shape[-1], blocks.band_len, sink, window,
        qk_scale, d, BLOCK_M=blocks.q_block, BLOCK_N=blocks.kv_block, BLOCK_D=block_d, BY_POSITION=by_position,
        PRECISION=precision, num_warps=8 if blocks.q_block >= 128 else 4)
    return out


def saap_decode(q: Tensor, k: Tensor, v: Tensor, blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int,
                scale: float | None = None, by_position: bool = False, splits: int | None = None) -> Tensor:
    """`saap_prefill` for at most one query block of queries (Lq <= q_block; decode: Lq == 1),
    flash-decoding style: each (batch, query head)'s listed key blocks in `splits` contiguous
    chunks, one program each (None: enough programs to fill the device), then combined."""
    qk_scale, block_d, precision = _check(q, k, v, blocks, lq=lq, lk=lk, sink=sink, window=window, scale=scale,
                                          by_position=by_position)
    if lq > blocks.q_block:
        raise ValueError(f"saap_decode takes one query block: {lq} queries > q_block {blocks.q_block}; use "
                         f"saap_prefill")
    b, hq, _, d = q.shape
    hkv, slots = blocks.slot_pos.shape[1:]
    n_qb, n_kb = blocks.kv_indices.shape[2:]
    splits = _splits(q.device, b * hq, n_kb) if splits is None else splits
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    block_m = max(DOT_MIN, triton.next_power_of_2(lq))
    m = q.new_empty((b * hq, splits, block_m), dtype=torch.float32)
    l = torch.empty_like(m)
    acc = q.new_empty((b * hq, splits, block_m, block_d), dtype=torch.float32)
    _decode_kernel[(b * hq, splits)](
        q, k, v, *_lists(blocks), m, l, acc, *q.stride(), *k.stride(), *v.stride(),
        hq, hkv, lq, lk - lq, slots, n_qb, n_kb, blocks.probe_bits.shape[-1], blocks.band_len, sink, window,
        qk_scale, d, SPLITS=splits, BLOCK_M=block_m, BLOCK_N=blocks.kv_block, BLOCK_D=block_d, BY_POSITION=by_position,
        PRECISION=precision)
    out = combine_splits(m, l, acc)
    return out.view(b, hq, block_m, block_d)[:, :, :lq, :d].to(q.dtype)


def combine_splits(m: Tensor, l: Tensor, acc: Tensor) -> Tensor:
    """(N, M, D): the softmax-weighted output of (N, splits, M) partial maxima (base 2) and sums
    and (N, splits, M, D) unnormalised outputs, as if one program had read every chunk. A split
    that read nothing (max -inf, sum 0) adds nothing; a row nothing read gives zeros."""
    top = m.amax(1, keepdim=True)
    weight = torch.exp2(m - top.masked_fill(top == float("-inf"), 0.0))
    total = (l * weight).sum(1)
    out = (acc * weight[..., None]).sum(1)
    return out / torch.where(total == 0, 1.0, total)[..., None]


def saap_attention_triton(q: Tensor, k: Tensor, v: Tensor, blocks: SAAPBlocks, *, lq: int, lk: int, sink: int,
                          window: int, scale: float | None = None) -> Tensor:
    """SAAP attention of q (B, Hq, Lq, D) over k, v (B, Hkv, Lk, D) as the model has them, through
    `blocks`: decode for at most DECODE_QUERIES queries in one query block, prefill otherwise.
    The keys are read by position, not copied into slots (module docstring)."""
    if lq <= min(DECODE_QUERIES, blocks.q_block):
        return saap_decode(q, k, v, blocks, lq=lq, lk=lk, sink=sink, window=window, scale=scale, by_position=True)
    return saap_prefill(q, k, v, blocks, lq=lq, lk=lk, sink=sink, window=window, scale=scale, by_position=True)


def _lists(blocks: SAAPBlocks) -> tuple[Tensor, ...]:
    """slot_pos, the block lists, the probe bits and the blocks' clusters, contiguous int32 as the
    kernels index them."""
    return tuple(t.to(torch.int32).contiguous() for t in (blocks.slot_pos, blocks.kv_num_blocks, blocks.kv_indices,
                                                          blocks.full_num_blocks, blocks.full_indices,
                                                          blocks.probe_bits, blocks.block_cluster))


def _splits(device: torch.device, programs: int, n_kb: int) -> int:
    """Chunks per head for decode: about two programs per SM over all heads (a few on CPU, where
    the interpreter runs each program in turn), never more than the key blocks."""
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_kb, -(-target // programs)))


def _check(q: Tensor, k: Tensor, v: Tensor, blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int,
           scale: float | None, by_position: bool) -> tuple[float, int, str]:
    """Clear errors for inputs the kernels cannot take; returns (scale * log2(e), the head dim's
    power of 2, tl.dot's precision: "ieee" for fp32, so that fp32 stays fp32 on tensor-core GPUs)."""
    if triton is None:
        raise RuntimeError("the SAAP Triton kernels need triton; without it use saap_attention_reference")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("CPU tensors run the SAAP Triton kernels only in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing this module, or use saap_attention_reference")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, Hq, Lq, D) and k, v one shape (B, Hkv, S or Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device or blocks.slot_pos.device != q.device:
        raise ValueError(f"q, k, v and the blocks must be on one device; got {q.device}, {k.device}, {v.device}, "
                         f"{blocks.slot_pos.device}")
    b, hkv, slots = blocks.slot_pos.shape
    hq, n_qb = blocks.kv_num_blocks.shape[1:]
    keys = lk if by_position else slots
    if q.shape[:3] != (b, hq, lq) or k.shape[:3] != (b, hkv, keys) or k.shape[3] != q.shape[3]:
        form = "(B, Hkv, Lk, D) (by_position)" if by_position else "(B, Hkv, S, D) (slots: gather_slots)"
        raise ValueError(f"the blocks are for q (B, Hq, Lq) = {(b, hq, lq)} and k, v {form} = {(b, hkv, keys)} "
                         f"with q's D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not 0 < lq <= lk or n_qb != -(-lq // blocks.q_block):
        raise ValueError(f"the blocks have {n_qb} query blocks of {blocks.q_block}; {lq} queries (<= lk = {lk}) "
                         f"need {-(-lq // blocks.q_block)}")
    if window < 1 or sink < 0:
        raise ValueError(f"window must be >= 1 and sink >= 0, got window {window}, sink {sink}")
    for name, size in (("q_block", blocks.q_block), ("kv_block", blocks.kv_block)):
        if size < DOT_MIN or size & (size - 1):
            raise ValueError(f"{name} is {size}: tl.dot needs a power of 2 of at least {DOT_MIN}; build the blocks "
                             f"with build_blocks(..., {name}={max(DOT_MIN, triton.next_power_of_2(size))})")
    d = q.shape[3]
    if d < DOT_MIN:
        raise ValueError(f"head dim {d} < {DOT_MIN}, tl.dot's smallest: pad q, k and v with zeros to {DOT_MIN} "
                         f"(pass scale=1/sqrt({d})) or use saap_attention_reference")
    scale = 1 / math.sqrt(d) if scale is None else scale
    return scale * LOG2E, triton.next_power_of_2(d), "ieee" if q.dtype == torch.float32 else "tf32"
