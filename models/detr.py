"""DETR (arXiv 2005.12872): a CNN backbone, a transformer encoder-decoder and set prediction.

The backbone (ResNet, frozen batch norm) gives a stride-32 feature map; a 1x1 conv projects it
to the transformer width. The encoder runs self-attention over the flattened map with a sine
position encoding, computed from the padding mask, added to queries and keys in every layer.
The decoder turns `num_queries` learned query embeddings into object slots; a linear head gives
class logits (`num_classes` + 1 for "no object") and a 3-layer MLP gives boxes
(cx, cy, w, h), normalised to [0, 1] by a sigmoid.

`forward` returns the predictions of *every* decoder layer, stacked: element -1 is the final
output, the others are the auxiliary outputs the set loss also supervises. Matching and the
loss live in `detr_loss.py`: the Hungarian matching runs on the CPU, outside the compiled model.

Layers are post-norm (residual add, then LayerNorm), as in the paper's code; the decoder's
final LayerNorm is applied to every layer's output before the heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import ResNet


@dataclass
class DETRConfig:
    backbone_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-50
    backbone_width: int = 64
    train_backbone: bool = True  # False freezes the whole backbone, not only stem + layer1
    dim: int = 256
    n_heads: int = 8
    ffn_hidden: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    num_queries: int = 100
    num_classes: int = 91  # COCO ids 0..90; logits have one more, the no-object class


def sine_position_encoding(mask: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """mask (B, H, W), True = padding -> encoding (B, H, W, dim).

    Each pixel's (y, x) is its index among the *unpadded* pixels of its column / row, scaled
    to [0, 2*pi] by the image's own valid height / width: an image keeps the same encoding
    whatever padding the batch adds. Half of `dim` encodes y, half x, in sin/cos pairs.
    """
    valid = (~mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    n = dim // 2
    # Frequencies temperature**(2i/n), each shared by one sin/cos pair.
    i = torch.arange(n, dtype=torch.float32, device=mask.device)
    freqs = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / n)

    def encode(coord: Tensor) -> Tensor:
        angles = coord[..., None] / freqs  # (B, H, W, n)
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(3)

    return torch.cat((encode(y), encode(x)), dim=-1)


class MultiheadAttention(nn.Module):
    """Attention with separate query/key/value inputs (DETR adds position encodings to q and k
    only) and a key padding mask. Same parameters as `nn.MultiheadAttention`."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        b, nq, dim = query.shape
        nk, head_dim = key.shape[1], dim // self.n_heads
        q = self.q_proj(query).view(b, nq, self.n_heads, head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, nk, self.n_heads, head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, nk, self.n_heads, head_dim).transpose(1, 2)
        # SDPA's boolean mask marks the keys that *take part*: the complement of padding.
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, padding)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DETRConfig):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.cross_attn = MultiheadAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.dim) for _ in range(3))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor,
                padding: Tensor) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, tgt)))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, padding)
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class BoxHead(nn.Module):
    """3-layer MLP (dim -> dim -> dim -> 4) with ReLUs between; sigmoid gives (cx, cy, w, h)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 4)])

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x.sigmoid()


class DETR(nn.Module):
    def __init__(self, cfg: DETRConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet(cfg.backbone_layers, cfg.backbone_width)
        # As in the paper's code: the stem and layer1 never train; with train_backbone=False
        # nothing in the backbone does. (Its batch norms are frozen buffers either way.)
        for name, p in self.backbone.named_parameters():
            trainable = cfg.train_backbone and name.startswith(("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, cfg.dim, kernel_size=1)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(cfg.dim)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.dim)
        self.class_head = nn.Linear(cfg.dim, cfg.num_classes + 1)
        self.box_head = BoxHead(cfg.dim)
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), mask (B, H, W) with True = padding ->
        class logits (L, B, Q, num_classes + 1) and boxes (L, B, Q, 4) for each of the
        L decoder layers; [-1] is the final prediction, [:-1] the auxiliary ones."""
        features = self.backbone(images)
        b, _, h, w = features.shape
        # Nearest-neighbour downsampling of the mask to the feature map (B acts as channels).
        mask = F.interpolate(mask[None].float(), size=(h, w))[0].bool()
        pos = sine_position_encoding(mask, self.cfg.dim).flatten(1, 2).to(features.dtype)  # (B, h*w, dim)
        padding = mask.flatten(1)  # (B, h*w)

        memory = self.input_proj(features).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        for layer in self.encoder:
            memory = layer(memory, pos, padding)

        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, memory, pos, padding)
            outputs.append(self.decoder_norm(tgt))
        hs = torch.stack(outputs)  # (L, B, Q, dim)
        return self.class_head(hs), self.box_head(hs)
