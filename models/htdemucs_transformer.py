"""The cross-domain transformer at the bottom of Hybrid Transformer Demucs (arXiv 2211.08553).

Two token streams meet here: the spectral branch (one token per (time frame, frequency bin))
and the waveform branch (one token per time step). Layers alternate between self-attention
within each stream and cross-attention, where each stream queries the other. Every layer is
pre-norm with LayerScale on both residuals and a GroupNorm(1) over the whole sequence at the
end ("norm_out"), as in the reference implementation (facebookresearch/demucs).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sin_embedding_1d(length: int, dim: int, max_period: float, like: Tensor) -> Tensor:
    """(length, dim) sinusoidal positions: cosines in the first half, sines in the second."""
    half = dim // 2
    pos = torch.arange(length, device=like.device, dtype=torch.float32)[:, None]
    # The reference spaces the periods over half-1 steps, so the last one is exactly max_period.
    periods = max_period ** (torch.arange(half, device=like.device, dtype=torch.float32) / (half - 1))
    phase = pos / periods
    return torch.cat([phase.cos(), phase.sin()], dim=-1).to(like.dtype)


def sin_embedding_2d(dim: int, n_freqs: int, n_frames: int, max_period: float, like: Tensor) -> Tensor:
    """(n_frames * n_freqs, dim) positions of spectral tokens, ordered frame-major.

    The first half of the channels encodes the time frame, the second half the frequency bin,
    each as interleaved (sin, cos) pairs.
    """
    half = dim // 2
    inv_freq = torch.exp(torch.arange(0, half, 2, device=like.device, dtype=torch.float32)
                         * -(math.log(max_period) / half))

    def interleaved(n: int) -> Tensor:  # (n, half): sin, cos, sin, cos, ...
        angle = torch.arange(n, device=like.device, dtype=torch.float32)[:, None] * inv_freq
        return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)

    time_part = interleaved(n_frames)[:, None, :].expand(n_frames, n_freqs, half)
    freq_part = interleaved(n_freqs)[None, :, :].expand(n_frames, n_freqs, half)
    return torch.cat([time_part, freq_part], dim=-1).reshape(n_frames * n_freqs, dim).to(like.dtype)


class LayerScale(nn.Module):
    """Per-channel residual scale, initialised small (Touvron et al. 2021)."""

    def __init__(self, dim: int, init: float, channel_dim: int = -1):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))
        self.channel_dim = channel_dim  # -1 for (batch, tokens, dim), 1 for (batch, dim, time)

    def forward(self, x: Tensor) -> Tensor:
        if self.channel_dim == 1:
            return self.scale[:, None] * x
        return self.scale * x


class SequenceGroupNorm(nn.GroupNorm):
    """GroupNorm on (batch, tokens, dim): normalises over all tokens and channels together."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with biases (the parameters of nn.MultiheadAttention)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim)
        self.wk = nn.Linear(dim, dim)
        self.wv = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)
        # As nn.MultiheadAttention: Xavier-uniform over the stacked (3 * dim, dim) q/k/v
        # projection, zero biases.
        bound = math.sqrt(6.0 / (4 * dim))
        for proj in (self.wq, self.wk, self.wv, self.wo):
            if proj is not self.wo:
                nn.init.uniform_(proj.weight, -bound, bound)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        b, tq, dim = query.shape
        tk = context.shape[1]
        q = self.wq(query).view(b, tq, self.n_heads, -1).transpose(1, 2)
        k = self.wk(context).view(b, tk, self.n_heads, -1).transpose(1, 2)
        v = self.wv(context).view(b, tk, self.n_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, tq, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int, layer_scale_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.gamma1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden)
        self.gamma2 = LayerScale(dim, layer_scale_init)
        self.norm_out = SequenceGroupNorm(1, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.gamma1(self.attn(h, h))
        x = x + self.gamma2(self.ffn(self.norm2(x)))
        return self.norm_out(x)


class CrossAttentionLayer(nn.Module):
    """Queries from one stream attend to the (separately normalised) other stream."""

    def __init__(self, dim: int, n_heads: int, hidden: int, layer_scale_init: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, n_heads)
        self.gamma1 = LayerScale(dim, layer_scale_init)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, hidden)
        self.gamma2 = LayerScale(dim, layer_scale_init)
        self.norm_out = SequenceGroupNorm(1, dim)

    def forward(self, x: Tensor, other: Tensor) -> Tensor:
        x = x + self.gamma1(self.attn(self.norm_q(x), self.norm_kv(other)))
        x = x + self.gamma2(self.ffn(self.norm_ffn(x)))
        return self.norm_out(x)


class CrossDomainTransformer(nn.Module):
    """Layer i is self-attention when i is even, cross-attention when i is odd.

    Each branch has its own weights: `layers` for spectral tokens, `layers_t` for waveform tokens.
    """

    def __init__(self, dim: int, n_layers: int, n_heads: int, hidden_scale: float = 4.0,
                 layer_scale_init: float = 1e-4, max_period: float = 10000.0,
                 pos_weight: float = 1.0):
        super().__init__()
        assert dim % n_heads == 0 and dim % 4 == 0
        self.max_period = max_period
        self.pos_weight = pos_weight
        hidden = int(dim * hidden_scale)
        self.norm_in = nn.LayerNorm(dim)
        self.norm_in_t = nn.LayerNorm(dim)
        self.layers = nn.ModuleList()
        self.layers_t = nn.ModuleList()
        for i in range(n_layers):
            kind = SelfAttentionLayer if i % 2 == 0 else CrossAttentionLayer
            self.layers.append(kind(dim, n_heads, hidden, layer_scale_init))
            self.layers_t.append(kind(dim, n_heads, hidden, layer_scale_init))

    def forward(self, x: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
        """x: spectral (batch, dim, freqs, frames); xt: waveform (batch, dim, time)."""
        b, dim, n_freqs, n_frames = x.shape
        x = x.permute(0, 3, 2, 1).reshape(b, n_frames * n_freqs, dim)  # frame-major tokens
        x = self.norm_in(x) + self.pos_weight * sin_embedding_2d(
            dim, n_freqs, n_frames, self.max_period, x)
        xt = xt.transpose(1, 2)
        xt = self.norm_in_t(xt) + self.pos_weight * sin_embedding_1d(
            xt.shape[1], dim, self.max_period, xt)

        for layer, layer_t in zip(self.layers, self.layers_t):
            if isinstance(layer, SelfAttentionLayer):
                x, xt = layer(x), layer_t(xt)
            else:
                x, xt = layer(x, xt), layer_t(xt, x)  # both read the other's previous output

        x = x.reshape(b, n_frames, n_freqs, dim).permute(0, 3, 2, 1)
        return x, xt.transpose(1, 2)
