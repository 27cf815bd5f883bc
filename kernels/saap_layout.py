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

Each query probes its own clusters (`probed` (B, Hq, Lq, P)); a query reads a cluster slot when
its cluster is one it probes (`probe_bits`: one bit per cluster; `block_cluster`: the cluster of
each key block). Queries are taken in blocks of `q_block` (in sequence order): a kernel loads the
key blocks of the clusters any query of the block probes (the block's union, `block_union`) once
for all of them, and masks each query to its own. The block lists say, per (batch, query
head, query block), which key blocks hold any read key (`kv_*`) and which of those hold only read
keys for every query of the block (`full_*`: the kernel skips the mask there): counts, then rows
of block indices as wide as the longest list (`dense_lists` widens them to FlexAttention's form).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SAAPBlocks:
    """The slots and block lists of one attention (module docstring)."""

    slot_pos: Tensor  # (B, Hkv, S) int32
    band_len: int  # slots [0, band_len) are the band part
    kv_num_blocks: Tensor  # (B, Hq, nQB) int32: partially read key blocks
    kv_indices: Tensor  # (B, Hq, nQB, W) int32: the first kv_num_blocks of each row are listed
    full_num_blocks: Tensor  # (B, Hq, nQB) int32: wholly read key blocks
    full_indices: Tensor  # (B, Hq, nQB, W) int32
    probe_bits: Tensor  # (B, Hq, Lq, ceil(C / 32)) int32: bit c % 32 of word c // 32 set: the query probes c
    block_cluster: Tensor  # (B, Hkv, S / kv_block) int32: each key block's cluster (-1: the band part)
    q_block: int
    kv_block: int

    def dense_lists(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The lists as FlexAttention's `BlockMask.from_kv_blocks` takes them: each row one entry
        per key block of the slots, the listed ones first (counts, indices, full counts, indices)."""
        n_kb = self.slot_pos.shape[-1] // self.kv_block
        out = []
        for num, idx in ((self.kv_num_blocks, self.kv_indices), (self.full_num_blocks, self.full_indices)):
            listed = torch.zeros(*idx.shape[:-1], n_kb + 1, dtype=torch.bool, device=idx.device)
            in_row = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
            listed.scatter_(-1, torch.where(in_row, idx.long(), n_kb), True)  # padding into the spare column
            order = (~listed[..., :n_kb]).to(torch.int8).argsort(dim=-1, stable=True)
            out += [num, order.to(torch.int32)]
        return tuple(out)

    def slots_read(self, lq: int) -> int:
        """Query-slot pairs the kernel computes (padding, masked keys and union waste included)."""
        per_block = (self.kv_num_blocks + self.full_num_blocks).long() * self.kv_block
        queries = torch.full((per_block.shape[-1],), self.q_block, device=per_block.device)
        queries[-1] = lq - self.q_block * (per_block.shape[-1] - 1)
        return int((per_block * queries).sum())


def probe_table(probed: Tensor, clusters: int) -> Tensor:
    """(B, Hq, Lq, C) bool: which clusters each query probes (probed (B, Hq, Lq, P))."""
    table = torch.zeros(*probed.shape[:3], clusters, dtype=torch.bool, device=probed.device)
    return table.scatter_(-1, probed.long(), True)


def _per_block(table: Tensor, q_block: int, fill: bool) -> Tensor:
    """(B, Hq, nQB, q_block, C): the per-query table in blocks, the last padded with `fill`."""
    b, hq, lq, c = table.shape
    blocks = -(-lq // q_block)
    padded = torch.full((b, hq, blocks * q_block, c), fill, dtype=torch.bool, device=table.device)
    padded[:, :, :lq] = table
    return padded.view(b, hq, blocks, q_block, c)


def block_union(table: Tensor, q_block: int) -> Tensor:
    """(B, Hq, nQB, W): the clusters any query of each block of `q_block` probes (`probe_table`'s
    (B, Hq, Lq, C)), as wide as the largest union, -1 past a block's own."""
    union = _per_block(table, q_block, False).any(3)
    width = max(int(union.sum(-1).max()), 1)
    order = (~union).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]
    return torch.where(union.gather(-1, order), order, -1)


def pack_bits(table: Tensor) -> Tensor:
    """(..., ceil(C / 32)) int32 words of a (..., C) bool table, bit c % 32 of word c // 32."""
    c = table.shape[-1]
    words = F.pad(table, (0, -c % 32)).unflatten(-1, (-1, 32)).long()
    packed = (words << torch.arange(32, device=table.device)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the same 32 bits, signed


def per_query(probed_blocks: Tensor, lq: int, q_block: int) -> Tensor:
    """(B, Hq, Lq, P): each query's probed clusters, its block's."""
    return probed_blocks.repeat_interleave(q_block, dim=2)[:, :, :lq]


def build_blocks(key_cluster: Tensor, probed: Tensor, clusters: int, *, sink: int, window: int, q_block: int,
                 kv_block: int) -> SAAPBlocks:
    """The slots and block lists for keys `key_cluster` (B, Hkv, Lk) and queries probing `probed`
    (B, Hq, Lq, P); the queries are the last Lq positions. Each query block's candidates are few
    (its sink and window blocks, its union's clusters' blocks), so the lists are built from them,
    never from every (query block, key block) pair."""
    b, hkv, lk = key_cluster.shape
    hq, lq = probed.shape[1], probed.shape[2]
    if probed.shape[0] != b or lq > lk:
        raise ValueError(f"probed (B, Hq, Lq, P) = {tuple(probed.shape)} does not fit key_cluster (B, Hkv, Lk) = "
                         f"{tuple(key_cluster.shape)}")
    table = probe_table(probed, clusters)
    probed_blocks = block_union(table, q_block)
    all_probe = _per_block(table, q_block, True).all(3)  # (B, Hq, nQB, C): every query of the block probes it
    n_qb = probed_blocks.shape[2]
    device = key_cluster.device
    band_len = -(-lk // kv_block) * kv_block
    band_pos = torch.arange(band_len, device=device)
    band_pos = torch.where(band_pos < lk, band_pos, -1).expand(b, hkv, band_len)
    cluster_pos, cluster_first_block, cluster_blocks = _cluster_slots(key_cluster, clusters, kv_block)
    cluster_of_block = _cluster_of_block(cluster_first_block, cluster_blocks, cluster_pos.shape[-1] // kv_block)
    slot_pos = torch.cat([band_pos, cluster_pos], dim=-1).to(torch.int32)
    n_band = band_len // kv_block

    q_start = (lk - lq) + torch.arange(n_qb, device=device) * q_block  # positions of each block's queries
    q_end = torch.clamp(q_start + q_block, max=lk) - 1
    group = hq // hkv
    band = _band_candidates(q_start, q_end, n_band, sink=sink, window=window, q_block=q_block, kv_block=kv_block)
    in_union = _cluster_candidates(probed_blocks, (cluster_first_block + n_band).repeat_interleave(group, dim=1),
                                   cluster_blocks.repeat_interleave(group, dim=1))
    candidate = torch.cat([band.expand(b, hq, -1, -1), in_union], -1)  # (B, Hq, nQB, W): key blocks, -1: none

    # Each candidate's first and last key and whether it holds padding (B, Hq, nQB, W).
    blocks = slot_pos.view(b, hkv, -1, kv_block)
    valid = blocks >= 0
    per_block = (torch.where(valid, blocks, lk).amin(-1), blocks.amax(-1), ~valid.all(-1))
    first, last, padded = (t.repeat_interleave(group, dim=1).gather(-1, candidate.clamp(min=0).flatten(2))
                           .view(candidate.shape) for t in per_block)
    q_start, q_end = q_start[:, None], q_end[:, None]
    # Band blocks: some key of the block is the sink or in some query's window, and causal.
    band_read = (first <= q_end) & ((first < sink) | (last > q_start - window))
    band_full = ~padded & (last <= q_start) & ((last < sink) | (q_end - first < window))
    # Cluster blocks (of the union's clusters): some key is causal; wholly read when every key is
    # causal for every query, none is a sink or window key of any query, and every query probes it.
    cluster_read = first <= q_end
    cluster_full = ~padded & (first >= sink) & (last <= q_start - window)
    block_cluster = torch.cat([torch.full((b, hkv, n_band), -1, device=device), cluster_of_block], -1)
    of_candidate = block_cluster.repeat_interleave(group, dim=1).gather(-1, candidate.clamp(min=0).flatten(2))
    cluster_full &= all_probe.gather(-1, of_candidate.view(candidate.shape).clamp(min=0))
    is_band = candidate < n_band
    read = (candidate >= 0) & torch.where(is_band, band_read, cluster_read)
    full = read & torch.where(is_band, band_full, cluster_full)
    kv_num, kv_idx = _listed_first(read & ~full, candidate)
    full_num, full_idx = _listed_first(full, candidate)
    width = max(kv_idx.shape[-1], full_idx.shape[-1])
    kv_idx, full_idx = (torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in (kv_idx, full_idx))
    return SAAPBlocks(slot_pos, band_len, kv_num, kv_idx, full_num, full_idx, pack_bits(table),
                      block_cluster.to(torch.int32), q_block, kv_block)


def _band_candidates(q_start: Tensor, q_end: Tensor, n_band: int, *, sink: int, window: int, q_block: int,
                     kv_block: int) -> Tensor:
    """(nQB, W) the band blocks a query block may read: the sink's, then those from its first
    query's window start to its last query (-1: none)."""
    sink_ids = torch.arange(-(-sink // kv_block), device=q_start.device).expand(q_start.shape[0], -1)
    window_start = torch.clamp(q_start - window + 1, min=0) // kv_block
    window_ids = window_start[:, None] + torch.arange(-(-(q_block + window - 1) // kv_block) + 1, device=q_start.device)
    window_ids = torch.where((window_ids >= sink_ids.shape[1]) & (window_ids <= q_end[:, None] // kv_block),
                             window_ids, -1)
    return torch.cat([torch.where(sink_ids < n_band, sink_ids, -1), window_ids], -1)


def _cluster_candidates(probed_blocks: Tensor, first_block: Tensor, n_blocks: Tensor) -> Tensor:
    """(B, Hq, nQB, P * most blocks of a cluster): every key block of each probed cluster (-1:
    none); first_block and n_blocks (B, Hq, C) say where each cluster's blocks are."""
    b, hq, n_qb, probes = probed_blocks.shape
    flat = probed_blocks.long().flatten(2)
    start, count = first_block.gather(-1, flat.clamp(min=0)), n_blocks.gather(-1, flat.clamp(min=0))  # (B, Hq, nQB * P)
    count = torch.where(flat >= 0, count, 0)
    step = torch.arange(max(int(n_blocks.max()), 1), device=flat.device)
    ids = torch.where(step < count[..., None], start[..., None] + step, -1)
    return ids.view(b, hq, n_qb, -1)


def _cluster_slots(key_cluster: Tensor, clusters: int, kv_block: int) -> tuple[Tensor, Tensor, Tensor]:
    """The cluster part: (B, Hkv, S2) the position in each slot (-1: padding), and (B, Hkv, C)
    each cluster's first block (counted from the part's start) and number of blocks. S2 is the
    longest any clustering can need, whole empty blocks at the end."""
    b, hkv, lk = key_cluster.shape
    key_cluster = key_cluster.long()
    counts = torch.zeros(b, hkv, clusters, dtype=torch.long, device=key_cluster.device)
    counts.scatter_add_(-1, key_cluster, torch.ones_like(key_cluster))
    padded = -(-counts // kv_block) * kv_block
    starts = padded.cumsum(-1) - padded
    # One length for any clustering of lk keys (each cluster wastes under one block): the kernels'
    # shapes then depend on lk alone, so a compiled kernel serves every layer and input.
    length = -(-(lk + clusters * (kv_block - 1)) // kv_block) * kv_block

    order = key_cluster.argsort(dim=-1, stable=True)  # positions grouped by cluster, in order within
    sorted_cluster = key_cluster.gather(-1, order)
    first_of_cluster = counts.cumsum(-1) - counts
    rank = torch.arange(lk, device=key_cluster.device) - first_of_cluster.gather(-1, sorted_cluster)
    slot = starts.gather(-1, sorted_cluster) + rank
    pos = torch.full((b, hkv, length), -1, dtype=torch.long, device=key_cluster.device)
    pos.scatter_(-1, slot, order)
    return pos, starts // kv_block, padded // kv_block


def _cluster_of_block(first_block: Tensor, n_blocks: Tensor, total: int) -> Tensor:
    """(B, Hkv, total) the cluster of each block of the cluster part (-1: the empty blocks at its
    end), from each cluster's first block and count (B, Hkv, C)."""
    ends = first_block + n_blocks  # clusters lie in order, so a block's cluster is the first ending after it
    block = torch.arange(total, device=first_block.device)
    cluster = torch.searchsorted(ends.contiguous(), block.expand(*ends.shape[:2], -1).contiguous(), right=True)
    return torch.where(cluster < ends.shape[-1], cluster, -1)


def _listed_first(listed: Tensor, candidate: Tensor) -> tuple[Tensor, Tensor]:
    """(count, the listed candidates first, as narrow as the longest list) of (..., W) flags
    over (..., W) candidate blocks; entries past a row's count are padding."""
    order = (~listed).to(torch.int8).argsort(dim=-1, stable=True)
    count = listed.sum(-1)
    width = max(int(count.max()) if count.numel() else 0, 1)
    return count.to(torch.int32), candidate.gather(-1, order[..., :width]).clamp(min=0).to(torch.int32)


def slot_mask_mod(blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int, group: int):
    """FlexAttention's mask_mod for slots: which slots of a listed block a query reads (module
    docstring's rule; the block lists already say which clusters)."""
    slot_pos, band_len, offset = blocks.slot_pos, blocks.band_len, lk - lq
    bits, block_cluster, kv_block = blocks.probe_bits, blocks.block_cluster, blocks.kv_block

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        k_pos = slot_pos[b, h // group, kv_idx]
        always = (k_pos < sink) | (q_pos - k_pos < window)
        cluster = block_cluster[b, h // group, kv_idx // kv_block].clamp(min=0)
        probes = ((bits[b, h, q_idx, cluster // 32] >> (cluster % 32)) & 1) == 1
        in_band = kv_idx < band_len
        return (k_pos >= 0) & (k_pos <= q_pos) & (always == in_band) & (in_band | probes)

    return mask_mod


def read_mask(blocks: SAAPBlocks, *, lq: int, lk: int, sink: int, window: int) -> Tensor:
    """(B, Hq, Lq, Lk) bool: the keys each query reads as the kernels read them: every slot of its
    block's full blocks, the slots of its partial blocks that `slot_mask_mod` lets through (for
    tests: it must equal `saap_read_mask` of the same probes)."""
    b, hkv, slots = blocks.slot_pos.shape
    hq, n_qb = blocks.kv_num_blocks.shape[1:]
    kv_num, kv_idx, full_num, full_idx = blocks.dense_lists()
    first_n = torch.arange(kv_idx.shape[-1])
    listed = []  # per query (B, Hq, Lq, S): the slots of the partial blocks, then of the full ones
    for num, idx in ((kv_num, kv_idx), (full_num, full_idx)):
        per_block = torch.zeros(b, hq, n_qb, slots // blocks.kv_block, dtype=torch.bool)
        per_block.scatter_(-1, idx.long(), first_n < num[..., None])
        listed.append(per_query(per_block.repeat_interleave(blocks.kv_block, dim=-1), lq, blocks.q_block))
    partial, full = listed
    mask_mod = slot_mask_mod(blocks, lq=lq, lk=lk, sink=sink, window=window, group=hq // hkv)
    bi, hi, qi, si = torch.meshgrid(*(torch.arange(n) for n in partial.shape), indexing="ij")
    pos = blocks.slot_pos.repeat_interleave(hq // hkv, dim=1)[:, :, None, :].expand_as(partial).long()
    reads = (partial & mask_mod(bi, hi, qi, si)) | (full & (pos >= 0))
    out = torch.zeros(b, hq, lq, lk + 1, dtype=torch.long)
    out.scatter_add_(-1, torch.where(reads, pos, lk), reads.long())
    if out[..., :lk].max() > 1:
        raise AssertionError("a key is read twice (band and cluster part)")
    return out[..., :lk].bool()
