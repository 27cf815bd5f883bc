"""Where SAAP can apply: the attentions of a post-grad graph and the keys before their RoPE.

SDPA reaches the post-grad graph as one of its backend ops (`ATTENTION_OPS`: the CPU flash op,
and CUDA's flash, efficient and cuDNN ops), each with its own argument order. A site is one such
node: its query, key and value, whether it is causal, its scale, whether it has a mask, and its
layer (the attentions' order in the graph).

SAAP clusters keys before RoPE, so a site also names the pre-RoPE key (and query) where the key
is the half-split rotation `x * cos + cat(-x2, x1) * sin` of some x (x1, x2: x's halves along the
last dim, by `split` or by `slice`; casts around it allowed), as Llama-style models write it.
Where that pattern is not found, `pre_rope_key` is None and the reason says so.

Decoding with a static KV cache (models/kv_cache.py) attends over the whole cache through a
mask: there the key and value are the cache buffers with this step's keys written into them
(`index_put` or `index_copy` along the sequence dim, `CacheWrite`), and the pre-RoPE key is that
of the written keys.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

# op -> (position of is_causal, position of attn_mask or None); scale is a keyword everywhere.
ATTENTION_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (4, None),
    aten._scaled_dot_product_flash_attention.default: (4, None),
    aten._scaled_dot_product_efficient_attention.default: (6, 3),
    aten._scaled_dot_product_cudnn_attention.default: (6, 3),
}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


@dataclass
class CacheWrite:
    """`buffer` (B, H, L, D) with `new` (B, H, Lq, D) written at slots `slots` (Lq,) of dim 2."""
    buffer: fx.Node
    slots: fx.Node
    new: fx.Node


@dataclass
class AttentionSite:
    node: fx.Node
    layer: int
    q: fx.Node
    k: fx.Node
    v: fx.Node
    is_causal: bool
    scale: float | None
    has_mask: bool
    pre_rope_query: fx.Node | None
    pre_rope_key: fx.Node | None  # of the keys written this step where the key is a cache
    reason: str = ""  # why pre_rope_key is None
    mask: fx.Node | None = None
    key_cache: CacheWrite | None = None  # the key is a KV cache buffer written this step
    value_cache: CacheWrite | None = None


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention node of the graph, in order."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ATTENTION_OPS:
            continue
        causal_at, mask_at = ATTENTION_OPS[node.target]
        q, k, v = node.args[:3]
        mask = node.kwargs.get("attn_mask", node.args[mask_at] if mask_at is not None and len(node.args) > mask_at else None)
        is_causal = bool(node.kwargs.get("is_causal", node.args[causal_at] if len(node.args) > causal_at else False))
        key_cache, value_cache = cache_write(k), cache_write(v)
        pre_k, pre_q = unrope(key_cache.new if key_cache else k), unrope(q)
        sites.append(AttentionSite(node, len(sites), q, k, v, is_causal, node.kwargs.get("scale"), mask is not None,
                                   pre_q, pre_k, "" if pre_k is not None else "no half-split RoPE found on the key",
                                   mask, key_cache, value_cache))
    return sites


def cache_write(node: fx.Node) -> CacheWrite | None:
    """The cache write `node` is (`index_put(buffer, [None, None, slots], new)` or
    `index_copy(buffer, 2, slots, new)`, `buffer` a graph input), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.target == aten.index_put.default:
        buffer, indices, new = node.args[:3]
        if len(node.args) > 3 and node.args[3] or len(indices) != 3 or indices[0] is not None or indices[1] is not None:
            return None  # accumulate=True, or not the sequence dim alone
        slots = indices[2]
    elif node.target == aten.index_copy.default and node.args[1] in (2, -2):
        buffer, _, slots, new = node.args
    else:
        return None
    if not isinstance(buffer, fx.Node) or buffer.op != "placeholder" or buffer.meta["val"].dim() != 4:
        return None
    return CacheWrite(buffer, slots, new)


def unrope(node: fx.Node) -> fx.Node | None:
    """x where `node` computes x * cos + cat(-x2, x1) * sin (either operand order), else None."""
    node = _skip_casts(node)
    if node.target != aten.add.Tensor or len(node.args) != 2:
        return None
    for straight, rotated in (node.args, node.args[::-1]):
        x = _times_table(straight)
        if x is not None and _is_rotate_half_of(_times_table(rotated), x):
            return x
    return None


def _skip_casts(node):
    while isinstance(node, fx.Node) and node.target in _CASTS:
        node = node.args[0]
    return node


def _times_table(node) -> fx.Node | None:
    """The non-table operand of a `mul` (the table: the operand that is not computed from the
    other), casts skipped; None if `node` is no mul."""
    node = _skip_casts(node)
    if not isinstance(node, fx.Node) or node.target != aten.mul.Tensor:
        return None
    a, b = (_skip_casts(arg) for arg in node.args)
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    # The tensor carries the heads: (..., heads, seq, dim); the table broadcasts (seq, dim) or
    # (1, 1, seq, dim) or (batch, 1, seq, dim). Take the operand with more elements.
    return a if a.meta["val"].numel() >= b.meta["val"].numel() else b


def _is_rotate_half_of(node, x: fx.Node) -> bool:
    """`node` is cat([-x2, x1], -1) with x1, x2 the halves of x along its last dim."""
    if node is None or node.target != aten.cat.default:
        return False
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    if len(parts) != 2 or dim not in (-1, x.meta["val"].dim() - 1):
        return False
    first, second = (_skip_casts(p) for p in parts)
    if first.target != aten.neg.default:
        return False
    return _half_of(_skip_casts(first.args[0]), x) == 1 and _half_of(second, x) == 0


def _half_of(node, x: fx.Node) -> int | None:
    """0 or 1 if `node` is x's first or second half along the last dim, else None."""
    node = _skip_casts(node)
    half = x.meta["val"].shape[-1] // 2
    last = x.meta["val"].dim() - 1
    if node.target is operator.getitem:
        split = node.args[0]
        if split.target == aten.split.Tensor and _skip_casts(split.args[0]) is x and split.args[1] == half \
                and (split.args[2] if len(split.args) > 2 else 0) in (-1, last):
            return node.args[1]
        return None
    if node.target == aten.slice.Tensor and _skip_casts(node.args[0]) is x and node.args[1] in (-1, last):
        start, end = node.args[2], node.args[3] if len(node.args) > 3 else None
        if start == 0 and end == half:
            return 0
        if start == half and (end is None or end >= 2 * half):
            return 1
    return None
