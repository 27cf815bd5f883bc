"""DINOv2 (arXiv 2304.07193): a ViT trained by self-distillation, in one readable file.

Pre-norm ViT blocks with LayerScale; a learned position embedding for a 518 px image
(37x37 patches of 14 px + CLS) resized by bicubic interpolation for other image sizes; a mask
token that replaces the embedding of masked patches (iBOT); optional register tokens
("Vision Transformers Need Registers", arXiv 2309.16588), which get no position embedding.
ViT-g uses a SwiGLU FFN whose hidden width is 2/3 of 4x, rounded up to a multiple of 8
(the authors' "swiglufused" layer: one matrix for gate and up, one for down).

`forward(images, masks=None)` returns the final-normed tokens (batch, 1 + registers + patches,
dim): CLS first, then the registers, then the patches in row-major order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino_losses import self_distillation_losses


@dataclass
class DinoV2Config:
    img_size: int = 518  # the position embedding's native image size (37x37 patches)
    patch_size: int = 14
    dim: int = 384
    depth: int = 12
    n_heads: int = 6
    ffn_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (ViT-g)
    n_registers: int = 0
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-6
    # Position-embedding resizing as in the authors' code: the original models resize by a
    # scale factor of (n + 0.1) / 37 without antialiasing, the register models to size n with it.
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


def swiglu_hidden(ffn_hidden: int, multiple_of: int) -> int:
    """SwiGLU keeps the MLP's parameter count: 2/3 of its hidden width, rounded up."""
    hidden = int(ffn_hidden * 2 / 3)
    return (hidden + multiple_of - 1) // multiple_of * multiple_of


class LayerScale(nn.Module):
    """Per-channel scale on a residual branch; starts small, so each block starts near identity."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """silu(gate) * up, then down; gate and up share one matrix (w12) as in DINOv2's fused layer."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        ffn_hidden = int(cfg.dim * cfg.ffn_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.ls1 = LayerScale(cfg.dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.ffn == "mlp":
            self.mlp = Mlp(cfg.dim, ffn_hidden)
        elif cfg.ffn == "swiglu":
            self.mlp = SwiGLU(cfg.dim, swiglu_hidden(ffn_hidden, multiple_of=8))
        else:
            raise ValueError(f"unknown ffn {cfg.ffn!r}; use 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(cfg.dim, cfg.layerscale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.cfg = cfg
        self.n_prefix_tokens = 1 + cfg.n_registers  # CLS + registers, before the patches
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size**2, cfg.dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.n_registers, cfg.dim)) if cfg.n_registers else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # As in the authors' code (timm's ViT init); the mask token starts at zero.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, h_patches: int, w_patches: int) -> Tensor:
        """The position embedding for an h x w patch grid: the learned grid, resized bicubically.

        The grid sizes are Python ints (static under torch.compile), so the branch below is
        resolved at trace time and costs no graph break.
        """
        n = self.cfg.grid_size
        if h_patches == n and w_patches == n:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        grid = patch_pos.float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
        offset = self.cfg.interpolate_offset
        if offset:
            # A scale factor a little above h/n avoids rounding the output size down (dino#8).
            size_kw = {"scale_factor": ((h_patches + offset) / n, (w_patches + offset) / n)}
        else:
            size_kw = {"size": (h_patches, w_patches)}
        antialias = self.cfg.interpolate_antialias
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size_kw)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, dim)
        return torch.cat([cls_pos, patch_pos.to(self.pos_embed.dtype)], dim=1)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) -> input tokens (B, 1 + registers + patches, dim).

        masks: optional bool (B, patches); a masked patch's embedding is replaced by the mask
        token before the position embedding is added (so the student still knows where it is).
        """
        x = self.patch_embed(images)  # (B, dim, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(h, w)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return x

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Tensor:
        x = self.prepare_tokens(images, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def dinov2_train_loss(model: nn.Module, batch: tuple) -> Tensor:
    """One DINOv2 self-distillation step: DINO loss on CLS + iBOT loss on masked patches.
    (The paper adds a KoLeo regulariser on the CLS features with weight 0.1; left out.)"""
    loss_dino, loss_ibot, _, _ = self_distillation_losses(model, batch)
    return loss_dino + loss_ibot
