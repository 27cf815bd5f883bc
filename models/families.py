"""Imports every model family so that each registers its configs."""
from fvcompile.models import (  # noqa: F401
    chameleon_specs,
    deit_specs,
    detr_specs,
    dino_world_specs,
    dinov2_specs,
    dinov3_specs,
    htdemucs_specs,
    llama_specs,
)
