"""Registry entries of the DINO-world family (future DINOv2 patch-feature prediction)."""
from __future__ import annotations

import torch

from fvcompile.models.dino_world import DinoWorld, DinoWorldConfig, next_frame_loss
from fvcompile.models.registry import ModelSpec, register, seeded_randn

PAPER = "DINO-world (arXiv 2507.19468)"

CONFIGS = {
    "dino-world-tiny": DinoWorldConfig(enc_dim=32, dim=64, depth=2, n_heads=4),
    "dino-world-action-tiny": DinoWorldConfig(enc_dim=32, dim=64, depth=2, n_heads=4, action_dim=3),
    # A ViT-B-sized predictor (width 768, 12 blocks, 12 heads) over DINOv2 ViT-B/14 features.
    "dino-world-small": DinoWorldConfig(enc_dim=768, dim=768, depth=12, n_heads=12),
    # The paper-scale, ViT-g-sized predictor (width 1536, 40 blocks, 24 heads).
    "dino-world-large": DinoWorldConfig(enc_dim=768, dim=1536, depth=40, n_heads=24),
    # Action-conditioned fine-tuning of the small predictor; 7-D actions (e.g. an arm's
    # end-effector delta + gripper) are our choice, the paper's environments vary.
    "dino-world-action": DinoWorldConfig(enc_dim=768, dim=768, depth=12, n_heads=12, action_dim=7),
}

# Parameter counts (predictor only; the frozen encoder is not part of the model), d = width,
# e = encoder width, a = action width. Per block: 2 LayerNorms 4d, qkv 3d^2+3d, proj d^2+d,
# MLP 8d^2+5d  ->  12d^2 + 13d  (+ a*d + d for the action projection). Outside the blocks:
# input e*d+d, final LayerNorm 2d, output d*e+e.
#   small  (d=768,  e=768, 12 blocks): 12*(12*768^2 + 13*768)    = 85,054,464
#          + 590,592 (input) + 1,536 (norm) + 590,592 (output)   = 86,237,184
#   large  (d=1536, e=768, 40 blocks): 40*(12*1536^2 + 13*1536)  = 1,133,260,800
#          + 1,181,184 (input) + 3,072 (norm) + 1,180,416 (output) = 1,135,625,472
#   action (small + a=7): 86,237,184 + 12*(7*768 + 768)          = 86,310,912
PARAMS = {
    "dino-world-small": 86_237_184,
    "dino-world-large": 1_135_625_472,
    "dino-world-action": 86_310_912,
}

# Clip geometry: frames seen by the predictor and patches per frame (224 px / patch 14 = 16).
FRAMES = {"dino-world-tiny": 3, "dino-world-action-tiny": 3}
GRID = {"dino-world-tiny": 4, "dino-world-action-tiny": 4}


def _register(name: str, cfg: DinoWorldConfig) -> None:
    frames, grid = FRAMES.get(name, 8), GRID.get(name, 16)

    def features(model, batch_size: int, n_frames: int) -> torch.Tensor:
        return seeded_randn(model, batch_size, n_frames, grid, grid, cfg.enc_dim)

    def actions(model, batch_size: int) -> torch.Tensor:
        return seeded_randn(model, batch_size, frames, cfg.action_dim, seed=1)

    def example_inputs(model, batch_size=2):
        x = features(model, batch_size, frames)
        return (x, actions(model, batch_size)) if cfg.action_dim else (x,)

    def train_batch(model, batch_size=2):
        # frames + 1 frames: the model sees the first `frames` and predicts the last `frames`.
        x = features(model, batch_size, frames + 1)
        return (x, actions(model, batch_size)) if cfg.action_dim else (x,)

    register(ModelSpec(
        name=name,
        family="dino_world",
        paper=PAPER,
        build=lambda: DinoWorld(cfg),
        example_inputs=example_inputs,
        train_batch=train_batch,
        train_step=lambda model, batch: next_frame_loss(model, *batch),
        params=PARAMS.get(name),
        tiny=name.endswith("tiny"),
        notes="input: frozen DINOv2 patch features (B, T, H, W, D_enc); frame-causal mask, "
              "3-axis RoPE; smooth-L1 next-frame loss",
        extra={"config": cfg, "frames": frames, "grid": grid},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
