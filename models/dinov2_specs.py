"""Registry entries of the DINOv2 family (backbones only; parameter counts without heads)."""
from __future__ import annotations

from dataclasses import replace


from fvcompile.models.dino_losses import self_distillation_batch
from fvcompile.models.dinov2 import DinoV2, DinoV2Config, dinov2_train_loss
from fvcompile.models.registry import ModelSpec, model_device, model_dtype, register, seeded_randn

PAPER = "DINOv2 (arXiv 2304.07193)"
REGISTERS_PAPER = "DINOv2 with registers (arXiv 2309.16588)"

BACKBONES = {
    "dinov2-s14": DinoV2Config(dim=384, depth=12, n_heads=6),
    "dinov2-b14": DinoV2Config(dim=768, depth=12, n_heads=12),
    "dinov2-l14": DinoV2Config(dim=1024, depth=24, n_heads=16),
    "dinov2-g14": DinoV2Config(dim=1536, depth=40, n_heads=24, ffn="swiglu"),
}
PARAMS = {"dinov2-s14": 22_056_576, "dinov2-b14": 86_580_480,
          "dinov2-l14": 304_368_640, "dinov2-g14": 1_136_480_768}

CONFIGS = dict(BACKBONES)
for _name, _cfg in BACKBONES.items():
    # The register models resize the position embedding to the exact grid, with antialiasing.
    CONFIGS[f"{_name}-reg"] = replace(_cfg, n_registers=4, interpolate_offset=0.0,
                                      interpolate_antialias=True)
    PARAMS[f"{_name}-reg"] = PARAMS[_name] + 4 * _cfg.dim
CONFIGS["dinov2-tiny"] = DinoV2Config(img_size=56, dim=32, depth=2, n_heads=2)

# Image sizes: forward and global crops at 224 px (16x16 patches, so the 37x37 position
# embedding is resized), 8 local crops at 98 px, as in the paper's training.
SIZES = {"global": 224, "local": 98, "n_local": 8, "n_prototypes": 65536}
TINY_SIZES = {"global": 42, "local": 28, "n_local": 2, "n_prototypes": 64}
MASK_RATIO = 0.3


def self_distillation_inputs(cfg, sizes: dict, mask_ratio: float):
    """example_inputs and train_batch of a DINO-family spec (shared by DINOv2 and DINOv3)."""

    def images(model, batch_size: int = 2) -> tuple:
        return (seeded_randn(model, batch_size, 3, sizes["global"], sizes["global"]),)

    def train_batch(model, batch_size: int = 2) -> tuple:
        return self_distillation_batch(
            batch_size, sizes["global"], sizes["local"], sizes["n_local"], cfg.patch_size,
            cfg.dim, sizes["n_prototypes"], mask_ratio, model_device(model), model_dtype(model))

    return images, train_batch


def _register(name: str, cfg: DinoV2Config) -> None:
    tiny = name.endswith("tiny")
    sizes = TINY_SIZES if tiny else SIZES
    images, train_batch = self_distillation_inputs(cfg, sizes, MASK_RATIO)

    register(ModelSpec(
        name=name,
        family="dinov2",
        paper=REGISTERS_PAPER if name.endswith("-reg") else PAPER,
        build=lambda: DinoV2(cfg),
        example_inputs=images,
        train_batch=train_batch,
        train_step=dinov2_train_loss,
        params=PARAMS.get(name),
        tiny=tiny,
        notes="backbone only; train step: DINO (CLS) + iBOT (masked patches) self-distillation, "
              "teacher = the same network under no_grad, frozen prototype heads",
        extra={"config": cfg, "sizes": sizes, "mask_ratio": MASK_RATIO},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
