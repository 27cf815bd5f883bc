"""SAAP's key layout and block lists: what the sparse kernels (CPU FlexAttention, Triton) read.

The keys of each KV head are laid out in slots, in two parts:

- the band part: the keys in sequence order, padded to a whole number of key blocks; the sink
  and window keys are read here;
- the cluster part: the keys grouped by cluster (in sequence order within a cluster), each
  cluster starting at a key block and padded to whole blocks.

`slot_pos` (B, Hkv, S) holds the sequence position of the key in each slot (-1: padding).
A query at position p reads slot s (position j = slot_pos[s]) when j >= 0, j <= p, and
- in the band part: j < sink or p - j < window;
- in the cluster part: neither (those keys are read in the band part) and the slot's block is
  listed for the query's block.

Queries are taken in blocks of `q_block` (in sequence order); a query block probes clusters as
one (`probe_blocks`: the mean of its queries' classifier probabilities, top `probes`), so that
every key block a kernel loads is useful to every query of the block. The block lists say,
per (batch, query head, query block), which key blocks hold any read key (`kv_*`) and which of
those hold only read keys (`full_*`: the kernel skips the mask there), in FlexAttention's
`BlockMask.from_kv_blocks` form: counts, then block indices with the listed blocks first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SAAPBlocks:
    """The slots and block lists of one attention (module docstring)."""

    slot_pos: Tensor  # (B, Hkv, S) int32
    band_len: int  # slots [0, band_len) are the band part
    kv_num_blocks: Tensor  # (B, Hq, nQB) int32: partially read key blocks
    kv_indices: Tensor  # (B, Hq, nQB, S // kv_block) int32
    full_num_blocks: Tensor  # (B, Hq, nQB) int32: wholly read key blocks
    full_indices: Tensor  # (B, Hq, nQB, S // kv_block) int32
    q_block: int
    kv_block: int

    def slots_read(self, lq: int) -> int:
        """Query-slot pairs the kernel computes (padding, masked keys and union waste included)."""
        per_block = (self.kv_num_blocks + self.full_num_blocks).long() * self.kv_block
        queries = torch.full((per_block.shape[-1],), self.q_block, device=per_block.device)
        queries[-1] = lq - self.q_block * (per_block.shape[-1] - 1)
        return int((per_block * queries).sum())


def probe_blocks(weight: Tensor, bias: Tensor, queries: Tensor, probes: int, q_block: int) -> Tensor:
    """(B, Hq, nQB, probes): the clusters each block of `q_block` queries probes: the top
    `probes` of its queries' mean classifier probability (queries (B, Hq, Lq, D) before RoPE,
    weight (Hq, D, C), bias (Hq, C)). A block of one query probes its classifier's top clusters."""
    b, hq, lq, _ = queries.shape
    probs = (queries.float() @ weight.float() + bias.float()[:, None, :]).softmax(-1)
    blocks = -(-lq // q_block)
    padded = probs.new_zeros(b, hq, blocks * q_block, probs.shape[-1])
    padded[:, :, :lq] = probs  # zero rows add nothing to the last block's sum
    return padded.view(b, hq, blocks, q_block, -1).sum(3).topk(probes, dim=-1).indices


def per_query(probed_blocks: Tensor, lq: int, q_block: int) -> Tensor:
    """(B, Hq, Lq, P): each query's probed clusters, its block's."""
    return probed_blocks.repeat_interleave(q_block, dim=2)[:, :, :lq]


def build_blocks(key_cluster: Tensor, probed_blocks: Tensor, clusters: int, *, lq: int, sink: int, window: int,
                 q_block: int, kv_block: int) -> SAAPBlocks:
    """The slots and block lists for keys `key_cluster` (B, Hkv, Lk) and query blocks probing
    `probed_blocks` (B, Hq, nQB, P); the queries are the last `lq` positions."""
    b, hkv, lk = key_cluster.shape
    hq, n_qb = probed_blocks.shape[1], probed_blocks.shape[2]
    if n_qb != -(-lq // q_block):
        raise ValueError(f"probed_blocks has {n_qb} query blocks; {lq} queries in blocks of {q_block} make "
                         f"{-(-lq // q_block)}")
    device = key_cluster.device
    band_len = -(-lk // kv_block) * kv_block
    band_pos = torch.arange(band_len, device=device)
    band_pos = torch.where(band_pos < lk, band_pos, -1).expand(b, hkv, band_len)
    cluster_pos, block_cluster = _cluster_slots(key_cluster, clusters, kv_block)
    slot_pos = torch.cat([band_pos, cluster_pos], dim=-1).to(torch.int32)

    blocks = slot_pos.view(b, hkv, -1, kv_block)
    valid = blocks >= 0
    first = torch.where(valid, blocks, lk).amin(-1)  # (B, Hkv, nKB): a block's first and last key
    last = blocks.amax(-1)
    padded = ~valid.all(-1)
    n_band = band_len // kv_block
    is_band = torch.arange(first.shape[-1], device=device) < n_band
    block_cluster = torch.cat([torch.full((b, hkv, n_band), clusters, device=device), block_cluster], -1)

    group = hq // hkv
    first, last, padded, block_cluster = (t.repeat_interleave(group, dim=1)[:, :, None, :]
                                          for t in (first, last, padded, block_cluster))
    q_start = (lk - lq) + torch.arange(n_qb, device=device) * q_block  # positions of each block's queries
    q_end = torch.clamp(q_start + q_block, max=lk) - 1
    q_start, q_end = q_start[:, None], q_end[:, None]

    # Band blocks: some key of the block is the sink or in some query's window, and causal.
    band_read = (first <= q_end) & ((first < sink) | (last > q_start - window))
    band_full = ~padded & (last <= q_start) & ((last < sink) | (q_end - first < window))
    # Cluster blocks: the block's cluster is probed and some key is causal; wholly read when every
    # key is causal for every query and none is a sink or window key of any query.
    probed = torch.zeros(b, hq, n_qb, clusters + 1, dtype=torch.bool, device=device)
    probed.scatter_(-1, probed_blocks.long(), True)
    probed[..., clusters] = False
    in_probed = probed.gather(-1, block_cluster.expand(b, hq, n_qb, -1).long())
    cluster_read = in_probed & (first <= q_end)
    cluster_full = cluster_read & ~padded & (first >= sink) & (last <= q_start - window)

    read = torch.where(is_band, band_read, cluster_read)
    full = read & torch.where(is_band, band_full, cluster_full)
    partial = read & ~full
    kv_num, kv_idx = _listed_first(partial)
    full_num, full_idx = _listed_first(full)
    return SAAPBlocks(slot_pos, band_len, kv_num, kv_idx, full_num, full_idx, q_block, kv_block)


def _cluster_slots(key_cluster: Tensor, clusters: int, kv_block: int) -> tuple[Tensor, Tensor]:
    """The cluster part: (B, Hkv, S2) the position in each slot (-1: padding) and (B, Hkv, S2 //
    kv_block) each block's cluster (`clusters`: a block past the last cluster). S2 is the
    longest head's padded length."""
    b, hkv, lk = key_cluster.shape
    key_cluster = key_cluster.long()
    counts = torch.zeros(b, hkv, clusters, dtype=torch.long, device=key_cluster.device)
    counts.scatter_add_(-1, key_cluster, torch.ones_like(key_cluster))
    padded = -(-counts // kv_block) * kv_block
    ends = padded.cumsum(-1)
    starts = ends - padded
    length = max(int(ends[..., -1].max()), kv_block)

    order = key_cluster.argsort(dim=-1, stable=True)  # positions grouped by cluster, in order within
    sorted_cluster = key_cluster.gather(-1, order)
    first_of_cluster = counts.cumsum(-1) - counts
    rank = torch.arange(lk, device=key_cluster.device) - first_of_cluster.gather(-1, sorted_cluster)
    slot = starts.gather(-1, sorted_cluster) + rank
    pos = torch.full((b, hkv, length), -1, dtype=torch.long, device=key_cluster.device)
    pos.scatter_(-1, slot, order)

    block_start = torch.arange(0, length, kv_block, device=key_cluster.device).expand(b, hkv, -1).contiguous()
    block_cluster = torch.searchsorted(ends, block_start, right=True)  # == clusters past the last one
    return pos, block_cluster


def _listed_first(listed: Tensor) -> tuple[Tensor, Tensor]:
    """(count, indices with the listed blocks first, in order) of a (..., nKB) bool."""
    order = (~listed).to(torch.int8).argsort(dim=-1, stable=True)
    return listed.sum(-1).to(torch.int32), order.to(torch.int32)


def slot_mask_mod(blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int, group: int):
    """FlexAttention's mask_mod for slots: which slots of a listed block a query reads (module
    docstring's rule; the block lists already say which clusters)."""
    slot_pos, band_len, offset = blocks.slot_pos, blocks.band_len, lk - lq

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        k_pos = slot_pos[b, h // group, kv_idx]
        always = (k_pos < sink) | (q_pos - k_pos < window)
        return (k_pos >= 0) & (k_pos <= q_pos) & (always == (kv_idx < band_len))

    return mask_mod


def read_mask(blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int) -> Tensor:
    """(B, Hq, Lq, Lk) bool: the keys each query reads through the block lists and `slot_mask_mod`
    (for tests: it must equal `saap_read_mask` with each query probing its block's clusters)."""
    b, hkv, slots = blocks.slot_pos.shape
    hq, n_qb = blocks.kv_num_blocks.shape[1:]
    listed = torch.zeros(b, hq, n_qb, slots // blocks.kv_block, dtype=torch.bool, device=blocks.slot_pos.device)
    for num, idx in ((blocks.kv_num_blocks, blocks.kv_indices), (blocks.full_num_blocks, blocks.full_indices)):
        first_n = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        listed |= torch.zeros_like(listed).scatter_(-1, idx.long(), first_n)
    per_slot = per_query(listed.repeat_interleave(blocks.kv_block, dim=-1), lq, blocks.q_block)  # (B, Hq, Lq, S)
    mask_mod = slot_mask_mod(blocks, lq=lq, lk=lk, sink=sink, window=window, group=hq // hkv)
    bi, hi, qi, si = torch.meshgrid(*(torch.arange(n) for n in per_slot.shape), indexing="ij")
    reads = per_slot & mask_mod(bi, hi, qi, si)
    pos = blocks.slot_pos.repeat_interleave(hq // hkv, dim=1)[:, :, None, :].expand_as(reads).long()
    out = torch.zeros(b, hq, lq, lk + 1, dtype=torch.long)
    out.scatter_add_(-1, torch.where(reads, pos, lk), reads.long())
    if out[..., :lk].max() > 1:
        raise AssertionError("a key is read twice (band and cluster part)")
    return out[..., :lk].bool()
