"""Chameleon: an early-fusion, token-based mixed-modal decoder (arXiv 2405.09818).

Text and images share one vocabulary and one decoder-only transformer. An image is turned into
1024 discrete codes (a 32x32 grid) by a VQ image tokenizer with a codebook of 8192 entries;
the codes are offset into a reserved range of the 65,536-token vocabulary and the image sits
in the sequence between a begin-image and an end-image token. The VQ tokenizer itself is not
part of this module: inputs are token ids.

The transformer is Llama-2-like (RMSNorm, SwiGLU FFN, RoPE, no biases) plus the paper's fix
for training stability: QK-norm, a LayerNorm on the queries and keys *per head* (statistics
over head_dim, with a separate affine weight and bias for every head), applied before RoPE.
The training loss adds the paper's z-loss (1e-5 * logsumexp(logits)^2) to the cross-entropy.

Vocabulary layout, as in Meta's released tokenizer: image codes at ids [4, 4 + 8192), then
the end-image token `<eoss>` (8196) and the begin-image token `<racm3:break>` (8197); text and
other special tokens take the other ids. Only "a contiguous reserved range" matters here.

Not modelled: the 7B model's dropout (0.1) and the 34B model's Swin-style norm reordering.

Decoding: `forward(tokens, cache, cache_pos, seq_start)` reads and writes a static KV cache
(models/kv_cache.py, from `new_kv_cache`), as the Llama does; without a cache, forward is the
plain causal model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# A sibling model file, imported relatively: model files import nothing of fvcompile.
from .kv_cache import KVCache, LayerKV, attention_mask, default_seq_start, rope_positions


@dataclass
class ChameleonConfig:
    vocab_size: int = 65536
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    ffn_hidden: int = 11008
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    max_seq_len: int = 4096
    image_code_offset: int = 4  # id of image code 0
    n_image_codes: int = 8192  # VQ codebook size
    image_tokens: int = 1024  # codes per image (32x32 latent grid of a 512x512 image)
    z_loss_weight: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def eoi_id(self) -> int:  # end-of-image token, right after the image range
        return self.image_code_offset + self.n_image_codes

    @property
    def boi_id(self) -> int:  # begin-of-image token
        return self.image_code_offset + self.n_image_codes + 1

    @property
    def first_text_id(self) -> int:  # ids from here to vocab_size - 1 are ordinary text tokens
        return self.boi_id + 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class PerHeadLayerNorm(nn.Module):
    """LayerNorm over each head's head_dim channels, with one weight and bias row per head.

    x: (batch, seq, heads, head_dim). Normalizing per head (not over the full width) is what
    bounds every head's attention logits, the growth the paper's QK-norm is there to stop.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return x * self.weight + self.bias


def rope_tables(head_dim: int, max_seq_len: int, base: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # half-split layout
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim) or (batch, 1, seq, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = PerHeadLayerNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm_eps)
        self.k_norm = PerHeadLayerNorm(cfg.n_heads, cfg.head_dim, cfg.qk_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None,
                cache_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(b, s, self.n_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # attend over the whole cache; the mask hides the slots not (yet) this row's
            k, v = kv.update(cache_pos, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: LayerKV | None = None,
                cache_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, kv, cache_pos, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Chameleon(nn.Module):
    def __init__(self, cfg: ChameleonConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: Tensor, cache: KVCache | None = None, cache_pos: Tensor | None = None,
                seq_start: Tensor | None = None) -> Tensor:
        """tokens: (batch, seq) int64 mixed text/image ids -> logits (batch, seq, vocab).

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
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, length, cfg.head_dim, dtype,
                       self.tok_embeddings.weight.device)


# --- mixed sequences ---------------------------------------------------------------------

def image_codes_to_tokens(codes: Tensor, cfg: ChameleonConfig) -> Tensor:
    """VQ codebook indices in [0, n_image_codes) -> vocabulary ids in the reserved image range."""
    return codes + cfg.image_code_offset


def tokens_to_image_codes(tokens: Tensor, cfg: ChameleonConfig) -> Tensor:
    return tokens - cfg.image_code_offset


def is_image_code(tokens: Tensor, cfg: ChameleonConfig) -> Tensor:
    return (tokens >= cfg.image_code_offset) & (tokens < cfg.image_code_offset + cfg.n_image_codes)


def build_mixed_sequence(text: Tensor, codes: Tensor, cfg: ChameleonConfig) -> Tensor:
    """[text tokens, <begin image>, image codes (offset into the image range), <end image>].

    text: (batch, text_len) vocabulary ids; codes: (batch, image_tokens) VQ indices.
    """
    b = text.shape[0]
    boi = torch.full((b, 1), cfg.boi_id, dtype=text.dtype, device=text.device)
    eoi = torch.full((b, 1), cfg.eoi_id, dtype=text.dtype, device=text.device)
    return torch.cat([text, boi, image_codes_to_tokens(codes.to(text.dtype), cfg), eoi], dim=1)


def next_token_loss(model: nn.Module, tokens: Tensor, z_loss_weight: float = 1e-5) -> Tensor:
    """Causal LM loss over the whole mixed sequence, plus z-loss on the log-partition."""
    logits = model(tokens[:, :-1]).flatten(0, 1).float()
    loss = F.cross_entropy(logits, tokens[:, 1:].flatten())
    if z_loss_weight:
        loss = loss + z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
    return loss


@torch.no_grad()
def generate_image(model: nn.Module, prompt: Tensor, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """Append <begin image>, sample cfg.image_tokens image codes, append <end image>.

    Modality constraint: at image positions every id outside the image range gets -inf, so
    only image codes can be sampled. No KV cache (recomputes the prefix each step): meant
    for tiny configs and tests. temperature 0 means greedy. Returns the full sequence.
    """
    cfg = model.cfg
    b = prompt.shape[0]
    allowed = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=prompt.device)
    allowed[cfg.image_code_offset:cfg.image_code_offset + cfg.n_image_codes] = True
    boi = torch.full((b, 1), cfg.boi_id, dtype=prompt.dtype, device=prompt.device)
    tokens = torch.cat([prompt, boi], dim=1)
    for _ in range(cfg.image_tokens):
        logits = model(tokens)[:, -1].float().masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            next_token = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token.to(tokens.dtype)], dim=1)
    eoi = torch.full((b, 1), cfg.eoi_id, dtype=prompt.dtype, device=prompt.device)
    return torch.cat([tokens, eoi], dim=1)


def count_params(cfg: ChameleonConfig) -> int:
    """Closed-form parameter count; the arithmetic for chameleon-7b is in chameleon_specs.py."""
    d = cfg.dim
    per_layer = (
        4 * d * d  # wq, wk, wv, wo
        + 2 * 2 * cfg.n_heads * cfg.head_dim  # q_norm and k_norm: weight + bias per head
        + 3 * d * cfg.ffn_hidden  # SwiGLU
        + 2 * d  # two RMSNorms
    )
    return cfg.vocab_size * d + cfg.n_layers * per_layer + d + d * cfg.vocab_size
