"""A Llama-3-style decoder in one readable file (after gpt-fast).

RMSNorm, real-valued rotary embeddings (half-split cos/sin, no complex tensors),
grouped-query attention through `scaled_dot_product_attention`, and a SwiGLU FFN.
`ffn="relu2"` swaps in a non-gated Squared-ReLU FFN, `W2 · relu(W1 x)²`, 1.5x wider so
both FFNs hold the same number of parameters (two matrices instead of three).

Decoding: `forward(tokens, cache, cache_pos, seq_start)` reads and writes a static KV cache
(models/kv_cache.py, from `new_kv_cache`); without a cache, forward is the plain causal model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A sibling model file, imported relatively: model files import nothing of fvcompile.
from .kv_cache import KVCache, LayerKV, attention_mask, default_seq_start, rope_positions


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_hidden: int = 14336  # SwiGLU width; relu2 uses 1.5x this
    ffn: str = "swiglu"  # "swiglu" or "relu2"
    norm_eps: float = 1e-5
    rope_base: float = 500000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout: [f0..f_{d/2}, f0..f_{d/2}]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim), or (batch, 1, seq, head_dim)
    # with a position per row (left-padded prompts)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None,
                cache_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # attend over the whole cache; the mask hides the slots not (yet) this row's
            k, v = kv.update(cache_pos, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SquaredReLU(nn.Module):
    """Non-gated Squared-ReLU FFN: W2 · relu(W1 x)²."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.relu(self.w1(x)).square())


def make_ffn(cfg: LlamaConfig) -> nn.Module:
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.dim, cfg.ffn_hidden)
    if cfg.ffn == "relu2":
        # Same parameter count as SwiGLU: 2 * dim * 1.5h == 3 * dim * h.
        return SquaredReLU(cfg.dim, cfg.ffn_hidden * 3 // 2)
    raise ValueError(f"unknown ffn {cfg.ffn!r}; use 'swiglu' or 'relu2'")


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = make_ffn(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None,
                cache_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv, cache_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: Tensor, cache: KVCache | None = None, cache_pos: Tensor | None = None,
                seq_start: Tensor | None = None) -> Tensor:
        """tokens: (batch, seq) int64 -> logits (batch, seq, vocab).

        With a cache: the tokens fill slots cache_pos (seq,) of every row, and attend to the slots
        of their row filled so far; row b's sequence starts at slot seq_start[b] (default 0)."""
        if cache is None:
            seq = tokens.shape[1]
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
            x = self.tok_embeddings(tokens)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.output(self.norm(x))
        seq_start = default_seq_start(tokens) if seq_start is None else seq_start
        positions = rope_positions(cache_pos, seq_start)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        mask = attention_mask(cache_pos, seq_start, cache.length)
        x = self.tok_embeddings(tokens)
        for layer, kv in zip(self.layers, cache.layers):
            x = layer(x, cos, sin, kv, cache_pos, mask)
        return self.output(self.norm(x))

    def new_kv_cache(self, batch_size: int, length: int, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed static cache for `batch_size` rows of up to `length` tokens, on the model's device."""
        cfg = self.cfg
        dtype = dtype or self.tok_embeddings.weight.dtype
        return KVCache(cfg.n_layers, batch_size, cfg.n_kv_heads, length, cfg.head_dim, dtype,
                       self.tok_embeddings.weight.device)


def next_token_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Causal LM loss: predict tokens[:, 1:] from tokens[:, :-1]."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


@torch.no_grad()
def generate_greedy(model: nn.Module, tokens: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding without a KV cache (recomputes the prefix: fine for short prompts)."""
    for _ in range(max_new_tokens):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens
