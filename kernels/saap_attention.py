"""SAAP attention (arXiv 2502.08246): causal attention that reads only some key clusters.

Each key belongs to one cluster (`key_cluster`, from the index's centroids); each query probes a
few clusters (`probed`, from its query classifier). A query at position p reads key j <= p when

- j < sink (the attention sink: the first tokens, always read),
- or p - j < window (the local window, the query itself included),
- or key j's cluster is one of the query's probed clusters.

This file holds the op `fvcompile::saap_attention` (what the saap pass puts in place of an
attention: keys assigned to their nearest centroid, each query probing its own clusters, then
attention over only the key blocks that hold read keys, `saap_layout`), its plain-PyTorch
reference (the test oracle) and the helpers that say which keys a query reads. On CPU the op
runs `sparse_attention`: FlexAttention compiled by Inductor, whose C++ template visits only the
listed key blocks, or for one query block its listed blocks gathered; a single query (decode)
runs `decode_attention`, its read keys gathered without a layout. The Triton kernels
(`saap_triton`) read the same layout on GPU. Over a static KV cache the op is
`saap_cache_attention`, which keeps each slot's cluster beside the cache.

Shapes (GQA: Hq a multiple of Hkv; query head h reads key head h // (Hq // Hkv)):
    q: (B, Hq, Lq, D), k and v: (B, Hkv, Lk, D), Lq <= Lk: the queries are the last Lq positions
    (prefill: Lq == Lk; decode: Lq == 1).
    key_cluster: (B, Hkv, Lk) integer cluster of each key.
    probed: (B, Hq, Lq, P) integer clusters each query probes (P may be 0: sink and window only).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from fvcompile.kernels import saap_triton
from fvcompile.kernels.saap_layout import SAAPBlocks, build_blocks, probe_table, slot_mask_mod


def saap_read_mask(key_cluster: Tensor, probed: Tensor, *, sink: int, window: int) -> Tensor:
    """(B, Hq, Lq, Lk) bool: the keys each query reads (module docstring's rule)."""
    _check_selection(key_cluster, probed, sink, window)
    batch, q_heads, lq, _ = probed.shape
    kv_heads, lk = key_cluster.shape[1], key_cluster.shape[2]
    clusters = key_cluster.repeat_interleave(q_heads // kv_heads, dim=1)  # (B, Hq, Lk)
    # in_probed[b, h, i, j]: key j's cluster is one that query i probes.
    in_probed = (clusters[:, :, None, :, None] == probed[:, :, :, None, :]).any(-1)
    pos = torch.arange(lk - lq, lk, device=probed.device)[:, None]  # each query's position
    key = torch.arange(lk, device=probed.device)[None, :]
    causal = key <= pos
    always = (key < sink) | (pos - key < window)
    return causal & (always | in_probed)


def saap_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_cluster: Tensor, probed: Tensor, *,
                             sink: int, window: int, scale: float | None = None) -> Tensor:
    """(B, Hq, Lq, D): softmax attention of each query over the keys it reads, in q's dtype
    (computed in fp32). Differentiable in q, k and v."""
    _check_shapes(q, k, v, key_cluster, probed)
    mask = saap_read_mask(key_cluster, probed, sink=sink, window=window)
    weights = attention_weights(q, k, mask, scale)
    return (weights @ v.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)).to(q.dtype)


def attention_weights(q: Tensor, k: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """(B, Hq, Lq, Lk) fp32 softmax weights of q (B, Hq, Lq, D) over the keys k (B, Hkv, Lk, D)
    that `mask` (broadcast to that shape) lets it read; query head h reads key head
    h // (Hq // Hkv); scale None: 1 / sqrt(D), SDPA's."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def assign_keys(centroids: Tensor, keys: Tensor) -> Tensor:
    """(..., Hkv, Lk) the cluster of each key (keys (..., Hkv, Lk, D) before RoPE; centroids
    (Hkv, C, D)): the most similar centroid (a key's norm does not change its cluster)."""
    return (keys.float() @ centroids.float().transpose(-1, -2)).argmax(-1)


def probe_clusters(weight: Tensor, bias: Tensor, queries: Tensor, probes: int, *, query_block: int = 1,
                   block_probes: int | None = None) -> Tensor:
    """(..., Hq, Lq, probes): the clusters each query's classifier ranks first (queries
    (..., Hq, Lq, D), weight (Hq, D, C), bias (Hq, C)). With `block_probes`, each block of
    `query_block` queries (counted from the first query) first keeps the `block_probes` clusters
    with the most classifier probability summed over its queries, and each query ranks only
    those: a kernel loads a block's clusters once for all its queries, so this caps what it loads
    (without the cap, 64 queries probing 4 clusters each cover nearly every cluster together)."""
    logits = queries.float() @ weight.float() + bias.float()[:, None, :]
    clusters = logits.shape[-1]
    if block_probes is not None and block_probes < clusters:
        if block_probes < probes:
            raise ValueError(f"block_probes ({block_probes}) must be >= probes ({probes})")
        lq = logits.shape[-2]
        probs = F.pad(logits.softmax(-1), (0, 0, 0, -lq % query_block))  # the last block padded with zeros
        mass = probs.unflatten(-2, (-1, query_block)).sum(-2)  # (..., nQB, C)
        kept = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, mass.topk(block_probes, dim=-1).indices, True)
        kept = kept.repeat_interleave(query_block, dim=-2)[..., :lq, :]
        logits = logits.masked_fill(~kept, float("-inf"))
    return logits.topk(probes, dim=-1).indices


# One layer's part of a SAAP index, by key (`register_tables`): the op takes the key, not the
# tensors, because Inductor lowers a custom op's constant tensor arguments with real tensors where
# it expects fake ones; the key also keeps the tables out of the graph (sparse24's warm-up
# schedules are registered the same way).
_TABLES: dict[str, tuple[Tensor, Tensor, Tensor]] = {}


def register_tables(key: str, centroids: Tensor, weight: Tensor, bias: Tensor) -> None:
    """Make (centroids (Hkv, C, D), weight (Hq, D, C), bias (Hq, C)) the tables of `key`."""
    _TABLES[key] = (centroids, weight, bias)


def _tables(key: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    if key not in _TABLES:
        raise KeyError(f"no SAAP tables registered as {key!r}: construct the SAAP pass with its index in this "
                       f"process before running a graph it compiled")
    tables = _TABLES[key]
    if tables[0].device != device:
        tables = _TABLES[key] = tuple(t.to(device) for t in tables)
    return tables


@torch.library.custom_op("fvcompile::saap_attention", mutates_args=())
def saap_attention(q: Tensor, k: Tensor, v: Tensor, q_pre: Tensor, k_pre: Tensor, *, tables: str, probes: int,
                   block_probes: int, sink: int, window: int, scale: float, query_block: int) -> Tensor:
    """Causal attention of q over the keys each query reads (module docstring), each query probing
    its classifier's top `probes` clusters among its block's top `block_probes` (`probe_clusters`):
    q, k, v as SDPA takes them (after RoPE); q_pre, k_pre the same before RoPE; tables: the key of one layer's part of a SAAP index (`register_tables`).
    Reads only the key blocks listed for each block of `query_block` queries (`sparse_attention`)."""
    centroids, weight, bias = _tables(tables, q.device)
    return _attend_clusters(q, k, v, assign_keys(centroids, k_pre), q_pre, tables, probes=probes,
                            block_probes=block_probes, sink=sink, window=window, scale=scale, query_block=query_block)


@saap_attention.register_fake
def _(q, k, v, q_pre, k_pre, *, tables, probes, block_probes, sink, window, scale, query_block):
    return q.new_empty(q.shape)


def _attend_clusters(q, k, v, key_cluster, q_pre, tables, *, probes, block_probes, sink, window, scale, query_block):
    """SAAP attention of q over k, v whose keys lie in clusters `key_cluster` (B, Hkv, Lk)."""
    centroids, weight, bias = _tables(tables, q.device)
    probed = probe_clusters(weight, bias, q_pre, probes, query_block=query_block, block_probes=block_probes)
    if q.shape[2] == 1 and not q.is_cuda:
        return decode_attention(q, k, v, key_cluster, probed, sink=sink, window=window, scale=scale)
    blocks = build_blocks(key_cluster, probed, centroids.shape[1], sink=sink, window=window, q_block=query_block,
                          kv_block=KV_BLOCK)
    return sparse_attention(q, k, v, blocks, sink=sink, window=window, scale=scale)


# The cluster of every slot of each KV cache the cached op has seen, by (tables, the key buffer's
# address and shape): each step assigns only the keys it writes (the paper's decode: a new key
# joins its nearest centroid); the slots a step reads were all written through the op before.
_KEY_CLUSTERS: dict[tuple, Tensor] = {}


def _cache_clusters(tables: str, key_buffer: Tensor) -> Tensor:
    key = (tables, key_buffer.data_ptr(), tuple(key_buffer.shape), key_buffer.device)
    if key not in _KEY_CLUSTERS:
        _KEY_CLUSTERS[key] = torch.zeros(key_buffer.shape[:3], dtype=torch.long, device=key_buffer.device)
    return _KEY_CLUSTERS[key]


@torch.library.custom_op("fvcompile::saap_cache_attention", mutates_args=())
def saap_cache_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, q_pre: Tensor, k_new_pre: Tensor,
                         slots: Tensor, key_buffer: Tensor, *, tables: str, probes: int, block_probes: int, sink: int,
                         window: int, scale: float, query_block: int, min_seq_len: int) -> Tensor:
    """Attention over a static KV cache (models/kv_cache.py), as SDPA(q, k, v, attn_mask=mask)
    computes it, with SAAP where the mask lets each query read exactly the slots up to its own:
    q (B, Hq, Lq, D) at cache slots `slots` (Lq,); k, v the whole cache (B, Hkv, L, D) with this
    step's keys written; k_new_pre those keys before RoPE (B, Hkv, Lq, D); key_buffer the cache's
    key buffer (only its address is read: it names the cache's key clusters). The written keys
    join their nearest centroids first. With the first n slots filled (the last query at slot
    n - 1, as prefill and decode of unpadded rows are) and n >= min_seq_len, the queries read as
    `saap_attention`'s do over those n keys; any other mask (left-padded rows, fewer keys) gets
    dense attention with that mask."""
    centroids = _tables(tables, q.device)[0]
    key_cluster = _cache_clusters(tables, key_buffer)
    key_cluster[:, :, slots] = assign_keys(centroids, k_new_pre)
    n = int(slots[-1]) + 1 if slots.numel() else 0
    if n >= min_seq_len and _is_causal_prefix(mask, slots, n, k.shape[2]):
        return _attend_clusters(q, k[:, :, :n], v[:, :, :n], key_cluster[:, :, :n], q_pre, tables, probes=probes,
                                block_probes=block_probes, sink=sink, window=window, scale=scale,
                                query_block=query_block)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@saap_cache_attention.register_fake
def _(q, k, v, mask, q_pre, k_new_pre, slots, key_buffer, *, tables, probes, block_probes, sink, window, scale,
      query_block, min_seq_len):
    return q.new_empty(q.shape)


def _is_causal_prefix(mask: Tensor, slots: Tensor, n: int, length: int) -> bool:
    """The queries sit at slots n - Lq .. n - 1, and `mask` (bool, or additive 0 / -inf) lets
    query i read slots 0 .. its own and nothing else, in every row and head."""
    lq = slots.shape[0]
    if not torch.equal(slots, torch.arange(n - lq, n, device=slots.device)):
        return False
    readable = mask if mask.dtype == torch.bool else mask == 0
    if mask.dtype != torch.bool and not bool((readable | (mask == float("-inf"))).all()):
        return False  # an additive mask with other values weights keys, not just hides them
    causal = torch.arange(length, device=mask.device) <= slots[:, None]
    return bool((readable == causal).all())


# Keys per block of the cluster layout: each cluster is padded to whole blocks, so a smaller block
# wastes fewer slots and a larger one runs the kernels' inner loops longer.
KV_BLOCK = 64


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, blocks: SAAPBlocks, *, sink: int, window: int,
                     scale: float | None = None) -> Tensor:
    """Attention over the slots that `blocks` lists and nothing else. On GPU: the Triton kernels
    (`saap_triton`). On CPU: one query block (decode) gathers its listed key blocks; more run
    FlexAttention compiled by Inductor, whose C++ template visits the listed blocks only. Equals
    `saap_attention_reference` with the probes the blocks were built from."""
    lq, lk = q.shape[2], k.shape[2]
    if q.is_cuda:
        return saap_triton.saap_attention_triton(q, k, v, blocks, lq=lq, lk=lk, sink=sink, window=window, scale=scale)
    if blocks.kv_num_blocks.shape[-1] == 1:
        return _one_query_block(q, k, v, blocks, lk=lk, sink=sink, window=window, scale=scale)
    k_slots, v_slots = saap_triton.gather_slots(k, v, blocks.slot_pos)
    group = q.shape[1] // k.shape[1]
    block_mask = BlockMask.from_kv_blocks(
        *blocks.dense_lists(), BLOCK_SIZE=(blocks.q_block, blocks.kv_block), seq_lengths=(lq, k_slots.shape[2]), compute_q_blocks=False,
        mask_mod=slot_mask_mod(blocks, lq=lq, lk=lk, sink=sink, window=window, group=group))
    return _compiled_flex_attention()(q, k_slots, v_slots, block_mask=block_mask, scale=scale, enable_gqa=True)


def _one_query_block(q, k, v, blocks, *, lk, sink, window, scale):
    """Decode: the keys of each query head's listed blocks gathered from k and v, then masked
    attention over them; the unlisted keys are never touched."""
    b, hq, lq, d = q.shape
    group = hq // k.shape[1]
    n_kb = blocks.kv_indices.shape[-1]
    listed = torch.cat([blocks.full_indices[:, :, 0], blocks.kv_indices[:, :, 0]], -1)  # (B, Hq, 2 nKB)
    is_listed = torch.cat([_first(blocks.full_num_blocks[:, :, 0], n_kb), _first(blocks.kv_num_blocks[:, :, 0], n_kb)], -1)
    width = int(is_listed.sum(-1).max())
    order = is_listed.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :width]
    chosen = listed.gather(-1, order).long()  # (B, Hq, width): the listed blocks first
    slots = (chosen[..., None] * blocks.kv_block + torch.arange(blocks.kv_block, device=q.device)).flatten(-2)
    kv_head = torch.arange(hq, device=q.device) // group
    batch = torch.arange(b, device=q.device)[:, None, None]
    pos = blocks.slot_pos[batch, kv_head[:, None], slots].long()
    pos = torch.where(is_listed.gather(-1, order).repeat_interleave(blocks.kv_block, -1), pos, -1)
    cluster = blocks.block_cluster[batch, kv_head[:, None], chosen].clamp(min=0).repeat_interleave(blocks.kv_block, -1)
    words = blocks.probe_bits[batch[..., None], torch.arange(hq, device=q.device)[:, None, None],
                              torch.arange(lq, device=q.device)[:, None], (cluster // 32)[:, :, None, :]]
    probes = ((words >> (cluster % 32)[:, :, None, :]) & 1) == 1  # (B, Hq, Lq, slots): the query probes it
    rows = pos.clamp(min=0) + (torch.arange(b, device=q.device)[:, None, None] * k.shape[1] + kv_head[:, None]) * lk
    keys, values = k.reshape(-1, d)[rows], v.reshape(-1, d)[rows]  # (B, Hq, width * kv_block, D)
    q_pos = (lk - lq + torch.arange(lq, device=q.device))[:, None]
    always = (pos[:, :, None, :] < sink) | (q_pos - pos[:, :, None, :] < window)
    in_band = (slots < blocks.band_len)[:, :, None, :]
    read = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= q_pos) & (always == in_band) & (in_band | probes)
    scale = 1 / math.sqrt(d) if scale is None else scale
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    return (scores.masked_fill(~read, float("-inf")).softmax(-1) @ values.float()).to(q.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_cluster: Tensor, probed: Tensor, *, sink: int, window: int,
                     scale: float | None = None) -> Tensor:
    """Decode on CPU: one query per row and head (q (B, Hq, 1, D), the last position) over k, v
    (B, Hkv, Lk, D). The keys it reads (the module docstring's rule) are found from their
    clusters alone, gathered to the front, and attended over; no layout is built (a decode step
    would spend more sorting the keys by cluster than attending), and the unread keys' vectors
    are never touched."""
    b, hq, _, d = q.shape
    kv_heads, lk = k.shape[1], k.shape[2]
    group = hq // kv_heads
    clusters = key_cluster.long().repeat_interleave(group, dim=1)  # (B, Hq, Lk)
    size = max(int(clusters.max()) if lk else 0, int(probed.max()) if probed.numel() else 0) + 1
    table = probe_table(probed, size)[:, :, 0]  # (B, Hq, C): the clusters each query probes
    key = torch.arange(lk, device=q.device)
    read = table.gather(-1, clusters) | (key < sink) | (lk - 1 - key < window)  # (B, Hq, Lk)
    count = read.sum(-1)
    width = max(int(count.max()), 1)
    index = torch.zeros(b, hq, width + 1, dtype=torch.long, device=q.device)  # the last column: a bin
    index.scatter_(-1, torch.where(read, read.cumsum(-1) - 1, width), key.expand(b, hq, -1))
    index = index[..., :width]
    rows = torch.arange(b, device=q.device)[:, None, None]
    heads = (torch.arange(hq, device=q.device) // group)[None, :, None]
    keys, values = k[rows, heads, index].float(), v[rows, heads, index].float()  # (B, Hq, width, D)
    scale = 1 / math.sqrt(d) if scale is None else scale
    scores = (q.float() @ keys.transpose(-1, -2)) * scale  # (B, Hq, 1, width)
    valid = torch.arange(width, device=q.device) < count[..., None]
    return (scores.masked_fill(~valid[:, :, None, :], float("-inf")).softmax(-1) @ values).to(q.dtype)


def _first(count: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=count.device) < count[..., None]


@functools.cache
def _compiled_flex_attention():
    # Uncompiled, flex_attention computes every block; compiled, Inductor's template (C++ on CPU,
    # Triton on GPU) visits the listed blocks only. One compile per sequence length.
    return torch.compile(flex_attention, dynamic=False)


def selectivity(mask: Tensor) -> float:
    """The fraction of the causal keys read, over every query (1.0: dense)."""
    lq, lk = mask.shape[-2:]
    causal_keys = sum(lk - lq + 1 + i for i in range(lq))
    return mask.sum().item() / (causal_keys * mask.shape[0] * mask.shape[1])


def _check_selection(key_cluster: Tensor, probed: Tensor, sink: int, window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query always reads itself), got {window}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    if key_cluster.dim() != 3 or probed.dim() != 4:
        raise ValueError(f"key_cluster must be (B, Hkv, Lk) and probed (B, Hq, Lq, P); got "
                         f"{tuple(key_cluster.shape)} and {tuple(probed.shape)}")
    if key_cluster.dtype.is_floating_point or probed.dtype.is_floating_point:
        raise TypeError(f"key_cluster and probed hold cluster ids: integer tensors, got "
                        f"{key_cluster.dtype} and {probed.dtype}")
    if probed.shape[1] % key_cluster.shape[1] or probed.shape[0] != key_cluster.shape[0]:
        raise ValueError(f"probed's batch and heads {tuple(probed.shape[:2])} do not fit key_cluster's "
                         f"{tuple(key_cluster.shape[:2])} (query heads a multiple of key heads)")
    if probed.shape[2] > key_cluster.shape[2]:
        raise ValueError(f"more queries ({probed.shape[2]}) than keys ({key_cluster.shape[2]})")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, key_cluster: Tensor, probed: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be (B, Hq, Lq, D) and k, v (B, Hkv, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_cluster.shape != k.shape[:3]:
        raise ValueError(f"key_cluster must be k's (B, Hkv, Lk) = {tuple(k.shape[:3])}, got {tuple(key_cluster.shape)}")
    if probed.shape[:3] != q.shape[:3]:
        raise ValueError(f"probed must start with q's (B, Hq, Lq) = {tuple(q.shape[:3])}, got {tuple(probed.shape)}")
