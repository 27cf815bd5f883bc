"""DINOv3 (arXiv 2508.10104): DINOv2's ViT with 2-D RoPE and Gram anchoring, in one readable file.

Differences from DINOv2 (models/dinov2.py), following the authors' `vision_transformer.py`:
- no learned position embedding: an axial 2-D RoPE rotates the queries and keys of the patch
  tokens (never the CLS or register tokens); patch centres are normalised to [-1, 1] along each
  axis, so the same frequencies serve every image size;
- 4 register ("storage") tokens, LayerNorm eps 1e-5, patch 16;
- the qkv bias exists but its key third is masked to zero in the forward ("mask_k_bias");
  the 7B model has no qkv bias at all;
- the 7B model uses a SwiGLU FFN (3x width, 2/3 of it rounded up to a multiple of 64) and a
  separate final norm for the CLS and register tokens of local crops
  ("untie_global_and_local_cls_norm").

`forward(images, masks=None, local_crops=False)` returns the final-normed tokens
(batch, 1 + registers + patches, dim): CLS, registers, then patches in row-major order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dino_losses import gram_loss, self_distillation_losses
from .dinov2 import LayerScale, Mlp, swiglu_hidden


@dataclass
class DinoV3Config:
    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    n_heads: int = 6
    ffn_ratio: float = 4.0
    ffn: str = "mlp"  # "mlp" (GELU) or "swiglu" (7B)
    swiglu_multiple_of: int = 64
    n_registers: int = 4
    qkv_bias: bool = True
    mask_k_bias: bool = True
    untie_local_cls_norm: bool = False
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-5
    rope_base: float = 100.0


def rope_sin_cos(h_patches: int, w_patches: int, head_dim: int, base: float,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Axial 2-D RoPE tables for an h x w patch grid: (h*w, head_dim) sin and cos, in fp32.

    A quarter of the head dim encodes each axis (periods base^(4i/head_dim)); the half-split
    layout repeats the angles [y-angles, x-angles] twice, to match `rotate_half`.
    """
    quarter = torch.arange(head_dim // 4, device=device, dtype=torch.float32)
    periods = base ** (4 * quarter / head_dim)
    # Patch centres in [-1, 1], each axis normalised by its own length ("separate").
    ys = (torch.arange(h_patches, device=device, dtype=torch.float32) + 0.5) / h_patches * 2 - 1
    xs = (torch.arange(w_patches, device=device, dtype=torch.float32) + 0.5) / w_patches * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (h*w, 2)
    angles = 2 * math.pi * coords[:, :, None] / periods  # (h*w, 2, head_dim // 4)
    angles = angles.flatten(1).tile(2)  # (h*w, head_dim)
    return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_patches(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last sin.shape[0] tokens (the patches) of x (B, heads, tokens, head_dim);
    the CLS and register tokens in front carry no position and pass unchanged."""
    n_prefix = x.shape[-2] - sin.shape[0]
    prefix, patches = x[..., :n_prefix, :], x[..., n_prefix:, :]
    rotated = (patches.float() * cos + rotate_half(patches.float()) * sin).type_as(x)
    return torch.cat([prefix, rotated], dim=-2)


class Attention(nn.Module):
    def __init__(self, cfg: DinoV3Config):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.mask_k_bias = cfg.mask_k_bias and cfg.qkv_bias
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def qkv_projection(self, x: Tensor) -> Tensor:
        if not self.mask_k_bias:
            return self.qkv(x)
        # The reference keeps a full-size qkv bias but zeroes its key part in the forward.
        q_bias, k_bias, v_bias = self.qkv.bias.chunk(3)
        bias = torch.cat([q_bias, torch.zeros_like(k_bias), v_bias])
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv_projection(x).view(b, t, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = rope_patches(q, sin, cos), rope_patches(k, sin, cos)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """silu(w1 x) * (w2 x), then w3 (separate gate and up matrices, as in DINOv3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, cfg: DinoV3Config):
        super().__init__()
        ffn_hidden = int(cfg.dim * cfg.ffn_ratio)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.dim, cfg.layerscale_init)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.ffn == "mlp":
            self.mlp = Mlp(cfg.dim, ffn_hidden)
        elif cfg.ffn == "swiglu":
            self.mlp = SwiGLU(cfg.dim, swiglu_hidden(ffn_hidden, cfg.swiglu_multiple_of))
        else:
            raise ValueError(f"unknown ffn {cfg.ffn!r}; use 'mlp' or 'swiglu'")
        self.ls2 = LayerScale(cfg.dim, cfg.layerscale_init)

    def forward(self, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV3(nn.Module):
    def __init__(self, cfg: DinoV3Config):
        super().__init__()
        self.cfg = cfg
        self.n_prefix_tokens = 1 + cfg.n_registers
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.n_registers, cfg.dim))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.local_cls_norm = (
            nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.untie_local_cls_norm else None
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.register_tokens, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def prepare_tokens(self, images: Tensor, masks: Tensor | None = None):
        """Images (B, 3, H, W) -> tokens (B, 1 + registers + patches, dim), and the h, w patch grid.
        masks: optional bool (B, patches); masked patch embeddings become the mask token."""
        x = self.patch_embed(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1), self.register_tokens.expand(b, -1, -1)]
        x = torch.cat([*prefix, x], dim=1)
        return x, h, w

    def forward(self, images: Tensor, masks: Tensor | None = None,
                local_crops: bool = False) -> Tensor:
        x, h, w = self.prepare_tokens(images, masks)
        head_dim = self.cfg.dim // self.cfg.n_heads
        sin, cos = rope_sin_cos(h, w, head_dim, self.cfg.rope_base, x.device)
        for block in self.blocks:
            x = block(x, sin, cos)
        if local_crops and self.local_cls_norm is not None:
            # 7B: the CLS and registers of local crops get their own final norm.
            prefix = self.local_cls_norm(x[:, : self.n_prefix_tokens])
            return torch.cat([prefix, self.norm(x[:, self.n_prefix_tokens :])], dim=1)
        return self.norm(x)


def dinov3_train_loss(model: nn.Module, batch: tuple, gram_weight: float = 1.0) -> Tensor:
    """One DINOv3 step: DINO (CLS) + iBOT (masked patches) + Gram anchoring.

    The Gram loss compares the student's patch features on the masked global crops with those
    of a Gram teacher on the unmasked crops. In the paper the Gram teacher is an earlier frozen
    snapshot of the teacher (one more no_grad forward); here it is the teacher pass itself.
    The paper also jitters the RoPE coordinates during training; this step does not, so that
    it is a function of the batch alone.
    """
    loss_dino, loss_ibot, student_patches, teacher_patches = self_distillation_losses(
        model, batch, local_kwargs={"local_crops": True})
    return loss_dino + loss_ibot + gram_weight * gram_loss(student_patches, teacher_patches)
