"""DeiT: a plain Vision Transformer trained with distillation (arXiv 2012.12877).

The network is timm's `vit_*_patch16_224`: a 16x16 patch-embedding conv, a class token,
learned position embeddings, pre-norm blocks (LayerNorm eps 1e-6, multi-head self-attention
with a qkv bias, GELU MLP of ratio 4), a final LayerNorm and a linear classification head.

The distilled variant adds a *distillation token* next to the class token and a second head
on it. In training mode the forward returns both heads' logits `(class, distillation)`, which
`distillation_loss` trains against the labels and a teacher; in eval mode it returns the mean
of the two heads, the paper's prediction at test time.

The teacher is a convnet in the paper (a RegNetY-16GF). `ConvTeacher` is a small frozen
stand-in with the same role: a fixed function from images to logits, run under no_grad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DeiTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 192
    depth: int = 12
    n_heads: int = 3
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    distilled: bool = False  # add a distillation token and a distillation head

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1  # class token (+ distillation token)


class PatchEmbed(nn.Module):
    """(batch, C, H, W) images -> (batch, n_patches, dim) tokens via a strided conv."""

    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # (batch, tokens, 3 * dim) -> 3 x (batch, heads, tokens, head_dim)
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # bidirectional: no mask
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.n_heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DeiT(nn.Module):
    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.distilled else None
        # One learned position per patch and per prefix token (197 at 224 px, 198 distilled).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_prefix_tokens + cfg.n_patches, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.head_dist = nn.Linear(cfg.dim, cfg.num_classes) if cfg.distilled else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As in DeiT/timm: truncated normal (std 0.02) for tokens, positions and linears.
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, images: Tensor) -> Tensor:
        """(batch, C, H, W) -> normed tokens (batch, prefix + patches, dim)."""
        x = self.patch_embed(images)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """images (batch, C, H, W) -> logits (batch, classes).

        Distilled models return `(class_logits, distillation_logits)` in training mode and
        their mean in eval mode.
        """
        x = self.features(images)
        logits = self.head(x[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


def distillation_loss(
    outputs: Tensor | tuple[Tensor, Tensor],
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    distillation: str = "hard",
    alpha: float = 0.5,
    tau: float = 1.0,
) -> Tensor:
    """The DeiT objective on the student's outputs.

    `outputs` is the class-head logits, or `(class, distillation)` logits from a distilled
    model in training mode. The class head always learns the labels by cross-entropy; the
    distillation head (the class head when there is none) learns the teacher:

    - "none": cross-entropy on the labels only.
    - "soft": (1 - alpha) * CE(class, labels) + alpha * tau^2 * KL(teacher/tau || student/tau),
      the KL averaged over the batch (paper eq. 2).
    - "hard": (1 - alpha) * CE(class, labels) + alpha * CE(distillation, teacher argmax);
      the paper uses alpha = 1/2 (eq. 3).
    """
    if isinstance(outputs, tuple):
        logits, logits_dist = outputs
    else:
        logits = logits_dist = outputs
    base = F.cross_entropy(logits.float(), labels)
    if distillation == "none":
        return base
    if teacher_logits is None:
        raise ValueError(f"distillation={distillation!r} needs teacher_logits")
    teacher = teacher_logits.float()
    if distillation == "soft":
        student_log_p = F.log_softmax(logits_dist.float() / tau, dim=-1)
        teacher_log_p = F.log_softmax(teacher / tau, dim=-1)
        kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
        teach = kl * tau * tau
    elif distillation == "hard":
        teach = F.cross_entropy(logits_dist.float(), teacher.argmax(dim=-1))
    else:
        raise ValueError(f"unknown distillation {distillation!r}; use 'none', 'soft' or 'hard'")
    return (1 - alpha) * base + alpha * teach


class ConvTeacher(nn.Module):
    """A small frozen convnet standing in for the paper's RegNetY teacher.

    Its weights are drawn from a fixed seed, so its logits are a fixed, deterministic function
    of the images: all a compile target of the student's training step needs from a teacher.
    """

    def __init__(self, in_chans: int, num_classes: int, width: int = 32, seed: int = 0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.zero_()  # biases
                else:  # variance-preserving weights: std 1 / sqrt(fan_in)
                    w = torch.randn(p.shape, generator=gen, device="cpu") / p[0].numel() ** 0.5
                    p.copy_(w)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def teacher_logits(images: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """Logits of the frozen `ConvTeacher` (built on the images' device) for `images`."""
    with torch.device("cpu"):  # seeded on CPU whatever the ambient device, then moved
        teacher = ConvTeacher(images.shape[1], num_classes, seed=seed)
    teacher = teacher.to(device=images.device, dtype=torch.float32)
    return teacher(images.float())
