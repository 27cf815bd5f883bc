"""Hybrid Transformer Demucs (Rouard, Massa, Défossez; arXiv 2211.08553) in one readable file.

Music source separation: a stereo mixture goes in, one waveform per source comes out.
Two U-Nets run side by side:
  - the spectral branch encodes the STFT of the mixture (complex-as-channels: real and
    imaginary parts are separate channels) with convolutions over the frequency axis;
  - the waveform branch encodes the raw signal with strided 1-D convolutions.
At the bottom, a cross-domain transformer (models/htdemucs_transformer.py) mixes the two.
Each decoder predicts every source; the spectral output goes back through the iSTFT and the
two branches are summed.

Shapes follow the reference implementation (facebookresearch/demucs, `htdemucs.py` with its
pretrained config), so that parameter counts match exactly. Simplifications, none of which
change the parameters of the paper configs:
  - the frequency axis never collapses to a single bin in these configs (nfft 4096, depth 4:
    2048 -> 8 bins), so the two branches never merge inside the U-Net and the reference's
    "empty" merge layers, Wiener filtering and MultiWrap are left out;
  - the forward runs on the length it is given (the reference pads evaluation inputs up to
    its training segment).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .htdemucs_transformer import CrossDomainTransformer, LayerScale


@dataclass
class HTDemucsConfig:
    n_sources: int = 4  # drums, bass, other, vocals
    audio_channels: int = 2  # stereo
    samplerate: int = 44100
    segment_samples: int = 343980  # the 7.8 s training segment of the pretrained model
    # U-Nets
    channels: int = 48  # width of the first layer; x`growth` per layer
    growth: int = 2
    depth: int = 4
    kernel_size: int = 8
    stride: int = 4
    context: int = 1  # the decoder's "rewrite" conv sees 1 + 2*context steps
    norm_starts: int = 4  # GroupNorm from this layer on (none with depth 4)
    norm_groups: int = 4
    # STFT (hop = nfft // 4)
    nfft: int = 4096
    # Frequency embedding added after the first spectral layer
    freq_emb: float = 0.2
    emb_scale: float = 10.0
    # DConv residual branches: 1 = encoder only, 2 = decoder only, 3 = both
    dconv_mode: int = 1
    dconv_depth: int = 2
    dconv_comp: int = 8
    dconv_init: float = 1e-3
    # Optional 1x1 projection to another width around the transformer (0 = none)
    bottom_channels: int = 0
    # Cross-domain transformer
    t_layers: int = 5
    t_heads: int = 8
    t_hidden_scale: float = 4.0
    t_layer_scale_init: float = 1e-4
    t_max_period: float = 10000.0
    # Initial conv weights are divided by sqrt(std / rescale) (0 = off)
    rescale: float = 0.1

    @property
    def hop_length(self) -> int:
        return self.nfft // 4

    @property
    def transformer_channels(self) -> int:
        return self.channels * self.growth ** (self.depth - 1)


class DConv(nn.Module):
    """Residual branch of dilated 1-D convolutions over time, in a compressed channel space."""

    def __init__(self, channels: int, compress: int, depth: int, init: float):
        super().__init__()
        hidden = int(channels / compress)
        self.layers = nn.ModuleList()
        for d in range(depth):
            dilation = 2**d
            self.layers.append(nn.Sequential(
                nn.Conv1d(channels, hidden, 3, dilation=dilation, padding=dilation),
                nn.GroupNorm(1, hidden),
                nn.GELU(),
                nn.Conv1d(hidden, 2 * channels, 1),
                nn.GroupNorm(1, 2 * channels),
                nn.GLU(1),
                LayerScale(channels, init, channel_dim=1),
            ))

    def forward(self, x: Tensor) -> Tensor:  # (batch, channels, time)
        for layer in self.layers:
            x = x + layer(x)
        return x


def dconv_along_time(dconv: DConv, y: Tensor) -> Tensor:
    """Apply a DConv to (batch, channels, time) or, per frequency bin, to (batch, ch, freqs, time)."""
    if y.dim() == 3:
        return dconv(y)
    b, c, fr, t = y.shape
    y = dconv(y.permute(0, 2, 1, 3).reshape(b * fr, c, t))
    return y.view(b, fr, c, t).permute(0, 2, 1, 3)


def _norm(use: bool, groups: int, channels: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if use else nn.Identity()


class EncoderLayer(nn.Module):
    """Strided conv (over frequency, or over time) -> GELU -> DConv -> 1x1 conv -> GLU.

    Padding is kernel_size // 4 so that the output is exactly input / stride long.
    """

    def __init__(self, chin: int, chout: int, freq: bool, cfg: HTDemucsConfig, norm: bool,
                 dconv: bool):
        super().__init__()
        k, s, pad = cfg.kernel_size, cfg.stride, cfg.kernel_size // 4
        self.freq, self.stride = freq, s
        if freq:  # convolve along frequency only: kernel (k, 1) on (batch, ch, freqs, frames)
            self.conv = nn.Conv2d(chin, chout, (k, 1), (s, 1), (pad, 0))
            self.rewrite = nn.Conv2d(chout, 2 * chout, 1)
        else:
            self.conv = nn.Conv1d(chin, chout, k, s, pad)
            self.rewrite = nn.Conv1d(chout, 2 * chout, 1)
        self.norm1 = _norm(norm, cfg.norm_groups, chout)
        self.dconv = DConv(chout, cfg.dconv_comp, cfg.dconv_depth, cfg.dconv_init) if dconv else None
        self.norm2 = _norm(norm, cfg.norm_groups, 2 * chout)

    def forward(self, x: Tensor) -> Tensor:
        if not self.freq and x.shape[-1] % self.stride:
            x = F.pad(x, (0, self.stride - x.shape[-1] % self.stride))
        y = F.gelu(self.norm1(self.conv(x)))
        if self.dconv is not None:
            y = dconv_along_time(self.dconv, y)
        return F.glu(self.norm2(self.rewrite(y)), dim=1)


class DecoderLayer(nn.Module):
    """Add skip -> conv with context -> GLU -> (DConv) -> transposed strided conv -> GELU."""

    def __init__(self, chin: int, chout: int, freq: bool, cfg: HTDemucsConfig, norm: bool,
                 dconv: bool, last: bool):
        super().__init__()
        k, s, ctx = cfg.kernel_size, cfg.stride, cfg.context
        self.freq, self.last, self.pad = freq, last, k // 4
        if freq:
            # The rewrite conv is (1+2ctx) x (1+2ctx): it sees neighbouring bins and frames.
            self.rewrite = nn.Conv2d(chin, 2 * chin, 1 + 2 * ctx, 1, ctx)
            self.conv_tr = nn.ConvTranspose2d(chin, chout, (k, 1), (s, 1))
        else:
            self.rewrite = nn.Conv1d(chin, 2 * chin, 1 + 2 * ctx, 1, ctx)
            self.conv_tr = nn.ConvTranspose1d(chin, chout, k, s)
        self.norm1 = _norm(norm, cfg.norm_groups, 2 * chin)
        self.dconv = DConv(chin, cfg.dconv_comp, cfg.dconv_depth, cfg.dconv_init) if dconv else None
        self.norm2 = _norm(norm, cfg.norm_groups, chout)

    def forward(self, x: Tensor, skip: Tensor, length: int) -> Tensor:
        """`length` is the time length to restore (waveform branch); frequency layers ignore it."""
        y = F.glu(self.norm1(self.rewrite(x + skip)), dim=1)
        if self.dconv is not None:
            y = dconv_along_time(self.dconv, y)
        z = self.norm2(self.conv_tr(y))
        if self.freq:  # (f - 1) * s + k bins -> f * s bins
            z = z[:, :, self.pad:-self.pad, :]
        else:
            z = z[..., self.pad:self.pad + length]
        return z if self.last else F.gelu(z)


class FreqEmbedding(nn.Module):
    """Learned embedding of the frequency bin, so that frequency convolutions are not equivariant.

    Stored divided by `scale` and multiplied back in forward: a `scale`x larger learning rate.
    Initialised smooth along frequency (normalised cumulative sum of Gaussians).
    """

    def __init__(self, n_freqs: int, dim: int, scale: float):
        super().__init__()
        self.scale = scale
        self.embedding = nn.Embedding(n_freqs, dim)
        with torch.no_grad():
            w = self.embedding.weight
            steps = torch.arange(1, n_freqs + 1, device=w.device, dtype=w.dtype)
            w.copy_(torch.cumsum(w, dim=0) / steps.sqrt()[:, None] / scale)

    def forward(self) -> Tensor:  # (dim, n_freqs)
        return (self.embedding.weight * self.scale).t()


def rescale_convs(module: nn.Module, reference: float) -> None:
    """Divide every conv's initial weights (and bias) by sqrt(std / reference).

    This moves the weight std to sqrt(std * reference), as the released reference does.
    """
    convs = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, convs):
                scale = (m.weight.std() / reference).sqrt()
                m.weight.div_(scale)
                if m.bias is not None:
                    m.bias.div_(scale)


class HTDemucs(nn.Module):
    def __init__(self, cfg: HTDemucsConfig):
        super().__init__()
        self.cfg = cfg
        audio = cfg.audio_channels
        chin, chin_z = audio, 2 * audio  # waveform / spectral input channels (complex as 2)
        ch = cfg.channels
        freqs = cfg.nfft // 2
        self.encoder, self.decoder = nn.ModuleList(), nn.ModuleList()  # spectral branch
        self.tencoder, self.tdecoder = nn.ModuleList(), nn.ModuleList()  # waveform branch
        self.freq_emb = None
        for index in range(cfg.depth):
            if freqs <= cfg.kernel_size:
                raise ValueError("the frequency axis collapses inside the U-Net; "
                                 "use a larger nfft or a smaller depth")
            norm = index >= cfg.norm_starts
            enc_dconv, dec_dconv = bool(cfg.dconv_mode & 1), bool(cfg.dconv_mode & 2)
            self.encoder.append(EncoderLayer(chin_z, ch, True, cfg, norm, enc_dconv))
            self.tencoder.append(EncoderLayer(chin, ch, False, cfg, norm, enc_dconv))
            if index == 0:  # the outermost decoders output every source
                chin = audio * cfg.n_sources
                chin_z = 2 * chin
            last = index == 0
            self.decoder.insert(0, DecoderLayer(ch, chin_z, True, cfg, norm, dec_dconv, last))
            self.tdecoder.insert(0, DecoderLayer(ch, chin, False, cfg, norm, dec_dconv, last))
            chin = chin_z = ch
            ch = int(cfg.growth * ch)
            freqs //= cfg.stride
            if index == 0 and cfg.freq_emb:
                self.freq_emb = FreqEmbedding(freqs, chin_z, cfg.emb_scale)

        if cfg.rescale:  # the U-Nets only, as in the reference (before the transformer exists)
            rescale_convs(self, cfg.rescale)

        dim = cfg.transformer_channels
        self.bottom = None
        if cfg.bottom_channels:
            self.bottom = nn.ModuleDict({
                "up": nn.Conv1d(dim, cfg.bottom_channels, 1),
                "down": nn.Conv1d(cfg.bottom_channels, dim, 1),
                "up_t": nn.Conv1d(dim, cfg.bottom_channels, 1),
                "down_t": nn.Conv1d(cfg.bottom_channels, dim, 1),
            })
            dim = cfg.bottom_channels
        self.transformer = None
        if cfg.t_layers:
            self.transformer = CrossDomainTransformer(
                dim, cfg.t_layers, cfg.t_heads, cfg.t_hidden_scale, cfg.t_layer_scale_init,
                cfg.t_max_period)

    # ---- STFT helpers ----------------------------------------------------------------------
    # Frames are aligned so that a signal of length L gives exactly ceil(L / hop) frames, the
    # same downsampling as the waveform convolutions: the signal is reflect-padded by 1.5 hops
    # (plus the round-up) and the 2 outermost frames on each side are dropped. The Nyquist
    # bin is dropped too, leaving nfft / 2 bins (a power of 2 for the strided convolutions).

    def spec(self, x: Tensor) -> Tensor:
        """(..., length) real -> (..., nfft/2, ceil(length/hop)) complex."""
        hop, nfft = self.cfg.hop_length, self.cfg.nfft
        prefix, length = x.shape[:-1], x.shape[-1]
        frames = math.ceil(length / hop)
        pad = hop // 2 * 3
        right = pad + frames * hop - length
        if max(pad, right) >= length:
            raise ValueError(f"input of {length} samples is too short for nfft={nfft}")
        x = F.pad(x.reshape(-1, 1, length), (pad, right), mode="reflect").squeeze(1)
        z = torch.stft(x, nfft, hop, window=torch.hann_window(nfft, device=x.device, dtype=x.dtype),
                       normalized=True, center=True, return_complex=True, pad_mode="reflect")
        return z[:, :-1, 2:2 + frames].reshape(*prefix, nfft // 2, frames)

    def ispec(self, z: Tensor, length: int) -> Tensor:
        """Inverse of `spec`: (..., nfft/2, frames) complex -> (..., length) real.

        The dropped frames and bin come back as zeros, so the round trip is exact only away
        from the edges and for signals without energy at Nyquist (as in the reference).
        """
        hop, nfft = self.cfg.hop_length, self.cfg.nfft
        prefix, (n_bins, frames) = z.shape[:-2], z.shape[-2:]
        z = F.pad(z.reshape(-1, n_bins, frames), (2, 2, 0, 1))  # restore dropped frames and bin
        pad = hop // 2 * 3
        padded_length = hop * math.ceil(length / hop) + 2 * pad
        x = torch.istft(z, nfft, hop, window=torch.hann_window(nfft, device=z.device,
                                                               dtype=z.real.dtype),
                        normalized=True, center=True, length=padded_length)
        return x[:, pad:pad + length].reshape(*prefix, length)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, mix: Tensor) -> Tensor:
        """mix: (batch, audio_channels, length) -> sources: (batch, n_sources, audio_channels, length)."""
        cfg = self.cfg
        b, _, length = mix.shape

        # Spectral branch input: complex as channels, (b, 2 * audio_channels, nfft/2, frames),
        # with the channel order (c0.real, c0.imag, c1.real, ...).
        z = self.spec(mix)
        x = torch.view_as_real(z).permute(0, 1, 4, 2, 3).flatten(1, 2)
        n_bins, frames = x.shape[-2:]
        # Both branches see normalised inputs; the outputs are scaled back below.
        mean, std = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) / (1e-5 + std)
        meant, stdt = mix.mean(dim=(1, 2), keepdim=True), mix.std(dim=(1, 2), keepdim=True)
        xt = (mix - meant) / (1e-5 + stdt)

        skips, skips_t, lengths_t = [], [], []
        for index, (encode, tencode) in enumerate(zip(self.encoder, self.tencoder)):
            lengths_t.append(xt.shape[-1])
            xt = tencode(xt)
            x = encode(x)
            if index == 0 and self.freq_emb is not None:
                x = x + cfg.freq_emb * self.freq_emb()[None, :, :, None]
            skips.append(x)
            skips_t.append(xt)

        if self.transformer is not None:
            if self.bottom is not None:
                x = self.bottom["up"](x.flatten(2)).unflatten(2, x.shape[2:])
                xt = self.bottom["up_t"](xt)
            x, xt = self.transformer(x, xt)
            if self.bottom is not None:
                x = self.bottom["down"](x.flatten(2)).unflatten(2, x.shape[2:])
                xt = self.bottom["down_t"](xt)

        for decode, tdecode in zip(self.decoder, self.tdecoder):
            x = decode(x, skips.pop(), frames)
            xt = tdecode(xt, skips_t.pop(), lengths_t.pop())

        # Spectral output: (b, sources, audio_channels, 2, bins, frames) -> complex -> iSTFT.
        x = x.view(b, cfg.n_sources, -1, n_bins, frames) * std[:, None] + mean[:, None]
        x = x.unflatten(2, (cfg.audio_channels, 2)).permute(0, 1, 2, 4, 5, 3)
        x = self.ispec(torch.view_as_complex(x.contiguous()), length)
        xt = xt.view(b, cfg.n_sources, cfg.audio_channels, length) * stdt[:, None] + meant[:, None]
        return x + xt


def separation_loss(model: nn.Module, sources: Tensor) -> Tensor:
    """Waveform L1 between the separated sources and the true ones; the input is their sum.

    sources: (batch, n_sources, audio_channels, length).
    """
    estimate = model(sources.sum(dim=1))
    return F.l1_loss(estimate, sources)
