"""A static, preallocated key/value cache for autoregressive decoding (after gpt-fast).

Every layer keeps a (batch, kv_heads, length, head_dim) key and value buffer, allocated once.
A forward writes its keys and values at the slots `cache_pos` names and attends over the whole
buffer through a mask, so every decode step has the same shapes: a compiled step never
recompiles as the sequence grows, and its buffers keep their addresses (CUDA graphs).

Rows of a batch may hold prompts of different lengths, left-padded: row b's sequence starts at
slot `seq_start[b]`. Its tokens get RoPE positions counted from there, and its queries never see
the padding slots before it. A padding slot sees itself (a query with no visible key at all would
give NaN, which its value would carry into the real queries' weighted sums).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerKV(nn.Module):
    """One layer's key and value buffers."""

    def __init__(self, batch_size: int, n_kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, length, head_dim)
        # Not persistent: a cache is scratch space, never part of a checkpoint.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (batch, kv_heads, seq, head_dim) at slots cache_pos (seq,); return the
        whole buffers (batch, kv_heads, length, head_dim)."""
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


class KVCache(nn.Module):
    """The static cache of a whole decoder: one `LayerKV` per layer."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(LayerKV(batch_size, n_kv_heads, length, head_dim, dtype, device)
                                    for _ in range(n_layers))

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def length(self) -> int:
        """Slots per row: the longest sequence (prompt + generated tokens) the cache holds."""
        return self.layers[0].k.shape[2]

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]


def default_seq_start(tokens: Tensor) -> Tensor:
    """Every row starts at slot 0 (no padding)."""
    return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)


def rope_positions(cache_pos: Tensor, seq_start: Tensor) -> Tensor:
    """(batch, seq) RoPE positions: each token's slot counted from its row's start (0 on padding)."""
    return (cache_pos[None, :] - seq_start[:, None]).clamp(min=0)


def attention_mask(cache_pos: Tensor, seq_start: Tensor, length: int) -> Tensor:
    """(batch, 1, seq, length) bool: query slot i of row b sees key slot j iff
    seq_start[b] <= j <= i, or j == i (a padding slot sees itself, see the module's note)."""
    slots = torch.arange(length, device=cache_pos.device)
    query = cache_pos[None, :, None]  # (1, seq, 1)
    causal = slots[None, None, :] <= query
    in_row = slots[None, None, :] >= seq_start[:, None, None]  # (batch, 1, length)
    return (causal & (in_row | (slots[None, None, :] == query))).unsqueeze(1)
