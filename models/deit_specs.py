"""Registry entries of the DeiT family.

Training steps:
- plain entries: cross-entropy of the class head on the labels.
- distilled entries: the DeiT hard-distillation step. The batch is `(images, labels,
  teacher_logits)`: the teacher's logits are computed once in `train_batch`, under no_grad, by
  a small frozen convnet with seeded weights (`ConvTeacher`, standing in for the paper's
  RegNetY-16GF). A frozen teacher's logits are a fixed function of the images, so computing
  them with the batch gives the same loss and gradients as running the teacher inside the
  step, keeps the step deterministic, and leaves only the student (the compile target) in it.
  `extra["teacher"]` builds that teacher for whoever wants to run it on other images.
"""
from __future__ import annotations

import torch
from torch import nn

from fvcompile.models.deit import ConvTeacher, DeiT, DeiTConfig, distillation_loss, teacher_logits
from fvcompile.models.registry import ModelSpec, model_device, register, seeded_randn

PAPER = "DeiT (arXiv 2012.12877)"

_WIDTHS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}  # (dim, heads)
_TEST = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, n_heads=2)

CONFIGS: dict[str, DeiTConfig] = {}
for _size, (_dim, _heads) in _WIDTHS.items():
    CONFIGS[f"deit-{_size}"] = DeiTConfig(dim=_dim, n_heads=_heads)
    CONFIGS[f"deit-{_size}-distilled"] = DeiTConfig(dim=_dim, n_heads=_heads, distilled=True)
CONFIGS["deit-tiny-test"] = DeiTConfig(**_TEST)
CONFIGS["deit-tiny-distilled-test"] = DeiTConfig(**_TEST, distilled=True)

# timm's deit_*_patch16_224 / deit_*_distilled_patch16_224 (with heads, 224 px).
PARAMS = {
    "deit-tiny": 5_717_416, "deit-small": 22_050_664, "deit-base": 86_567_656,
    "deit-tiny-distilled": 5_910_800, "deit-small-distilled": 22_436_432,
    "deit-base-distilled": 87_338_192,
}


def _images(model: nn.Module, cfg: DeiTConfig, batch_size: int) -> torch.Tensor:
    return seeded_randn(model, batch_size, cfg.in_chans, cfg.image_size, cfg.image_size)


def _labels(model: nn.Module, cfg: DeiTConfig, batch_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.num_classes, (batch_size,), generator=gen).to(model_device(model))


def classification_step(model: nn.Module, batch: tuple) -> torch.Tensor:
    images, labels = batch
    return distillation_loss(model(images), labels, distillation="none")


def hard_distillation_step(model: nn.Module, batch: tuple) -> torch.Tensor:
    """Student forward (both heads, training mode) + DeiT hard distillation, alpha 1/2."""
    images, labels, teacher = batch
    return distillation_loss(model(images), labels, teacher, distillation="hard")


def _register(name: str, cfg: DeiTConfig) -> None:
    def train_batch(model: nn.Module, batch_size: int = 2) -> tuple:
        images = _images(model, cfg, batch_size)
        labels = _labels(model, cfg, batch_size)
        if not cfg.distilled:
            return images, labels
        return images, labels, teacher_logits(images, cfg.num_classes)

    extra = {"config": cfg}
    if cfg.distilled:
        extra["teacher"] = lambda: ConvTeacher(cfg.in_chans, cfg.num_classes)
        extra["distillation"] = "hard"
    register(ModelSpec(
        name=name,
        family="deit",
        paper=PAPER,
        build=lambda: DeiT(cfg),
        example_inputs=lambda model, batch_size=2: (_images(model, cfg, batch_size),),
        train_batch=train_batch,
        train_step=hard_distillation_step if cfg.distilled else classification_step,
        params=PARAMS.get(name),
        tiny=name.endswith("-test"),
        notes="distilled: training mode returns (class, distillation) logits, eval their mean"
        if cfg.distilled else "",
        extra=extra,
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
