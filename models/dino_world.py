"""DINO-world: a predictor of future DINOv2 patch features (Baldassarre et al., arXiv 2507.19468).

A frozen DINOv2 encoder turns every frame of a video into a grid of patch features; DINO-world
learns to predict the *next* frame's grid from the past ones. The encoder is not part of this
module: the input is already the encoder's patch features, shape (B, T, H, W, D_enc), and the
output has the same shape: row t holds the prediction of frame t+1.

There is no public code. What we take from the paper (its abstract and Fig. 1 caption, and
public summaries of its method section; the full text was not available while writing this):
  - frozen DINOv2 encoder, prediction in its patch-feature space;
  - predictor: a stack of N residual pre-norm transformer blocks;
  - 3-axial RoPE: each token carries (time, row, column) coordinates, injected by rotary
    embeddings on separate slices of the head dimension;
  - a block-triangular ("frame-causal") attention mask, so that all patches of all frames are
    trained in parallel while respecting temporal causality;
  - action-conditioned fine-tuning adds zero-initialized action blocks that update each token
    with the action of its frame, so the fine-tuned model starts as the unconditional one;
  - the largest predictor is ViT-g-sized (as a third-party summary describes it); we read
    that as width 1536, 40 blocks, 24 heads (~1.1B parameters).

What we assume or simplify:
  - Self-attention over the past tokens with a frame-causal mask (a token sees every token of
    its own and earlier frames) and "output at frame t = prediction of frame t+1". The paper's
    predictor uses cross-attention from learned queries at the target (time, row, column) to
    the past tokens (the context tokens are not updated). The self-attention form keeps the
    same causal structure, updates every token in every block (more compute per token), and
    is the block-causal predictor design of e.g. V-JEPA 2-AC.
  - RoPE positions are integer frame / row / column indices with one base (10000) for all
    axes; the paper uses absolute timestamps in seconds (variable frame rates) and its own
    periods. Head-dim split: rows and columns get 2*(head_dim // 6) channels each, time the
    rest (64 -> 24/20/20, 96 -> 32/32/32).
  - ViT-style blocks as in DINOv2: LayerNorm (eps 1e-6), qkv and MLP with biases, GELU MLP
    of ratio 4, no LayerScale, no dropout.
  - Input: one Linear(D_enc -> width); output: LayerNorm + Linear(width -> D_enc).
  - Encoder: DINOv2 ViT-B/14 (D_enc = 768) at 224 px, i.e. 16x16 patches per frame.
  - Action block: one zero-initialized Linear(action_dim -> width) per transformer block,
    added to every token of frame t before the block's attention (a_t is the action taken
    after observing frame t, so it conditions the prediction of frame t+1).
  - Loss: smooth-L1 (PyTorch default beta = 1) between predicted and true next-frame
    features; see `next_frame_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DinoWorldConfig:
    enc_dim: int = 768  # DINOv2 ViT-B/14 patch-feature width (the frozen encoder's output)
    dim: int = 1536  # predictor width
    depth: int = 40
    n_heads: int = 24
    mlp_ratio: int = 4
    action_dim: int = 0  # 0: unconditional; > 0: per-frame action vectors of this size
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the (time, row, column) rotary axes."""
        space = 2 * (self.head_dim // 6)  # even, so that each axis rotates whole pairs
        return self.head_dim - 2 * space, space, space


def axis_inv_freq(axis_dim: int, base: float) -> Tensor:
    # One frequency per rotated pair of this axis' channels.
    return 1.0 / (base ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))


def apply_rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) by angle i.

    x: (batch, heads, tokens, head_dim); cos/sin: (tokens, head_dim // 2). Pairs are adjacent so
    the three axes' tables can simply be concatenated along the pair dimension.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: DinoWorldConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: DinoWorldConfig):
        super().__init__()
        # Zero-initialized: fine-tuning starts from exactly the unconditional model.
        self.action = nn.Linear(cfg.action_dim, cfg.dim) if cfg.action_dim > 0 else None
        if self.action is not None:
            nn.init.zeros_(self.action.weight)
            nn.init.zeros_(self.action.bias)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_ratio * cfg.dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                actions: Tensor | None) -> Tensor:
        if self.action is not None and actions is not None:
            # actions: (B, T, A) -> one vector per frame, added to every patch of that frame.
            t = actions.shape[1]
            x = (x.unflatten(1, (t, -1)) + self.action(actions)[:, :, None]).flatten(1, 2)
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class DinoWorld(nn.Module):
    def __init__(self, cfg: DinoWorldConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.enc_dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output_proj = nn.Linear(cfg.dim, cfg.enc_dim)
        d_t, d_h, d_w = cfg.rope_split
        self.register_buffer("inv_freq_t", axis_inv_freq(d_t, cfg.rope_base), persistent=False)
        self.register_buffer("inv_freq_h", axis_inv_freq(d_h, cfg.rope_base), persistent=False)
        self.register_buffer("inv_freq_w", axis_inv_freq(d_w, cfg.rope_base), persistent=False)

    def rope_angles(self, frames: int, height: int, width: int) -> Tensor:
        """Rotation angles of every token, (frames*height*width, head_dim // 2).

        Tokens are ordered frame-major, then row, then column. The first d_t/2 pair angles
        depend only on the frame index, the next d_h/2 only on the row, the last d_w/2 only
        on the column.
        """
        device = self.inv_freq_t.device
        t, h, w = torch.meshgrid(
            torch.arange(frames, device=device, dtype=torch.float32),
            torch.arange(height, device=device, dtype=torch.float32),
            torch.arange(width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        return torch.cat([
            t.reshape(-1, 1) * self.inv_freq_t,
            h.reshape(-1, 1) * self.inv_freq_h,
            w.reshape(-1, 1) * self.inv_freq_w,
        ], dim=-1)

    def frame_causal_mask(self, frames: int, tokens_per_frame: int) -> Tensor:
        """(N, N) boolean, True where query token i may attend key token j: frame(j) <= frame(i)."""
        frame = torch.arange(frames, device=self.inv_freq_t.device)
        frame = frame.repeat_interleave(tokens_per_frame)
        return frame[None, :] <= frame[:, None]

    def forward(self, features: Tensor, actions: Tensor | None = None) -> Tensor:
        """features: (B, T, H, W, D_enc) patch features of frames 0..T-1;
        actions: (B, T, action_dim) or None.
        Returns (B, T, H, W, D_enc): row t is the predicted features of frame t+1."""
        b, t, h, w, _ = features.shape
        angles = self.rope_angles(t, h, w)
        cos, sin = angles.cos(), angles.sin()
        mask = self.frame_causal_mask(t, h * w)
        x = self.input_proj(features.flatten(1, 3))  # (B, T*H*W, dim)
        for block in self.blocks:
            x = block(x, cos, sin, mask, actions)
        return self.output_proj(self.norm(x)).view(b, t, h, w, -1)


def next_frame_loss(model: nn.Module, features: Tensor, actions: Tensor | None = None) -> Tensor:
    """Teacher-forced next-frame prediction over a clip of T+1 frames.

    features: (B, T+1, H, W, D_enc); actions: (B, T, action_dim) or None. The model sees frames
    0..T-1 and, through the frame-causal mask, predicts frames 1..T all at once. Smooth-L1
    (beta = 1) on the features.
    """
    inputs = features[:, :-1]
    pred = model(inputs) if actions is None else model(inputs, actions)
    return F.smooth_l1_loss(pred.float(), features[:, 1:].float())


def count_params(cfg: DinoWorldConfig) -> int:
    """Closed-form parameter count (weights and biases), checked against the module in tests."""
    d, e, a = cfg.dim, cfg.enc_dim, cfg.action_dim
    hidden = cfg.mlp_ratio * d
    block = (
        2 * d  # norm1
        + 3 * d * d + 3 * d  # qkv
        + d * d + d  # proj
        + 2 * d  # norm2
        + d * hidden + hidden + hidden * d + d  # mlp
        + (a * d + d if a > 0 else 0)  # zero-initialized action projection
    )
    return (e * d + d) + cfg.depth * block + 2 * d + (d * e + e)
