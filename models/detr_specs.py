"""Registry entries of the DETR family."""
from __future__ import annotations

import torch

from fvcompile.models.detr import DETR, DETRConfig
from fvcompile.models.detr_loss import detr_train_step
from fvcompile.models.registry import ModelSpec, model_device, model_dtype, register

PAPER = "DETR (arXiv 2005.12872)"

CONFIGS = {
    "detr-tiny": DETRConfig(backbone_layers=(1, 1, 1, 1), backbone_width=8, dim=32, n_heads=4,
                            ffn_hidden=64, n_encoder_layers=2, n_decoder_layers=2,
                            num_queries=10, num_classes=10),
    "detr-r50": DETRConfig(),
    "detr-r101": DETRConfig(backbone_layers=(3, 4, 23, 3)),
}
# The counts of facebookresearch/detr (frozen batch norms hold buffers, not parameters).
PARAMS = {"detr-r50": 41_524_768, "detr-r101": 60_464_672}
# Batch shape (H, W) after padding; the paper resizes the shorter side to 800 (longer <= 1333).
IMAGE_SIZE = {"detr-tiny": (96, 128), "detr-r50": (800, 1216), "detr-r101": (800, 1216)}
MAX_OBJECTS = {"detr-tiny": 4}


def _register(name: str, cfg: DETRConfig) -> None:
    height, width = IMAGE_SIZE[name]
    max_objects = MAX_OBJECTS.get(name, 20)

    def images_and_mask(model, batch_size: int, gen: torch.Generator):
        """Random images padded to one batch shape: image 0 fills it, the others are at least
        half as tall and wide, zeros beyond their size and True in the mask there."""
        images = torch.randn(batch_size, 3, height, width, generator=gen)
        mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
        for b in range(1, batch_size):
            h = int(torch.randint(height // 2, height + 1, (), generator=gen))
            w = int(torch.randint(width // 2, width + 1, (), generator=gen))
            mask[b, h:, :] = True
            mask[b, :, w:] = True
        images = images.masked_fill(mask[:, None], 0.0)
        device = model_device(model)
        return images.to(device, model_dtype(model)), mask.to(device)

    def example_inputs(model, batch_size: int = 2) -> tuple:
        return images_and_mask(model, batch_size, torch.Generator().manual_seed(0))

    def train_batch(model, batch_size: int = 2) -> tuple:
        gen = torch.Generator().manual_seed(0)
        images, mask = images_and_mask(model, batch_size, gen)
        targets = []
        for _ in range(batch_size):
            n = int(torch.randint(1, max_objects + 1, (), generator=gen))
            centers = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
            sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
            targets.append({
                "labels": torch.randint(0, cfg.num_classes, (n,), generator=gen).to(images.device),
                "boxes": torch.cat([centers, sizes], dim=-1).to(images.device),
            })
        return images, mask, targets

    register(ModelSpec(
        name=name,
        family="detr",
        paper=PAPER,
        build=lambda: DETR(cfg),
        example_inputs=example_inputs,
        train_batch=train_batch,
        train_step=lambda model, batch: detr_train_step(model, *batch),
        params=PARAMS.get(name),
        tiny=name.endswith("tiny"),
        notes="forward returns (logits, boxes) of every decoder layer; Hungarian matching "
              "(scipy, CPU) runs between the compiled forward and the set loss",
        extra={"config": cfg, "image_size": IMAGE_SIZE[name]},
    ))


for _name, _cfg in CONFIGS.items():
    _register(_name, _cfg)
