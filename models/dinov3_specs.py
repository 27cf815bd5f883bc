"""Registry entries of the DINOv3 family (backbones only; parameter counts without heads)."""
from __future__ import annotations

from fvcompile.models.dinov2_specs import self_distillation_inputs
from fvcompile.models.dinov3 import DinoV3, DinoV3Config, dinov3_train_loss
from fvcompile.models.registry import ModelSpec, register

PAPER = "DINOv3 (arXiv 2508.10104)"

CONFIGS = {
    "dinov3-s16": DinoV3Config(dim=384, depth=12, n_heads=6),
    "dinov3-b16": DinoV3Config(dim=768, depth=12, n_heads=12),
    "dinov3-l16": DinoV3Config(dim=1024, depth=24, n_heads=16),
    "dinov3-7b16": DinoV3Config(dim=4096, depth=40, n_heads=32, ffn_ratio=3.0, ffn="swiglu",
                                qkv_bias=False, untie_local_cls_norm=True),
    "dinov3-tiny": DinoV3Config(dim=32, depth=2, n_heads=2),
}
PARAMS = {"dinov3-s16": 21_601_152, "dinov3-b16": 85_669_632,
          "dinov3-l16": 303_154_176, "dinov3-7b16": 6_716_043_264}

# Forward and global crops at 256 px (16x16 patches), 8 local crops at 112 px, as in the paper.
SIZES = {"global": 256, "local": 112, "n_local": 8, "n_prototypes": 65536}
TINY_SIZES = {"global": 64, "local": 32, "n_local": 2, "n_prototypes": 64}
MASK_RATIO = 0.3


def _register(name: str, cfg: DinoV3Config) -> None:
    tiny = name.endswith("tiny")
    sizes = TINY_SIZES if tiny else SIZES
    images, train_batch = self_distillation_inputs(cfg, sizes, MASK_RATIO)

    register(ModelSpec(
        name=name,
        family="dinov3",
        paper=PAPER,
        build=lambda: DinoV3(cfg),
        example_inputs=images,
        train_batch=train_batch,
        train_step=dinov3_train_loss,
        params=PARAMS.get(name),
        tiny=tiny,
        notes="backbone only; train step: DINO + iBOT + Gram anchoring, teacher = the same "
              "network under no_grad, frozen prototype heads",
        extra={"config": cfg, "sizes": sizes, "mask_ratio": MASK_RATIO},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
