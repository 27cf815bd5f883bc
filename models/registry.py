"""A registry of named model configs: the compile targets of `fvcompile bench` and `inspect`.

Each family module registers its configs with `register(ModelSpec(...))` at import time.
A spec knows how to build the model, make example inputs for its forward, and run one
training step (forward + loss; the caller runs `backward`). Builders honour the ambient
device, so `with torch.device("meta"): spec.build()` counts parameters with no memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    paper: str  # e.g. "DeiT (arXiv 2012.12877)"
    build: Callable[[], nn.Module]
    # example_inputs(model, batch_size) -> tuple of forward args on the model's device
    example_inputs: Callable[[nn.Module, int], tuple]
    # train_step(model, batch) -> scalar loss; batch comes from train_batch(model, batch_size)
    train_step: Callable[[nn.Module, tuple], torch.Tensor]
    train_batch: Callable[[nn.Module, int], tuple]
    params: int | None = None  # the reference architecture's parameter count, when known
    tiny: bool = False  # small enough for tests on CPU
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_families() -> None:
    # Importing a family module registers its specs.
    from fvcompile.models import families  # noqa: F401


def get(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown model {name!r}; known models: {known} (see `fvcompile models`)")
    return _REGISTRY[name]


def all_specs() -> list[ModelSpec]:
    _load_families()
    return list(_REGISTRY.values())


def count_parameters(spec: ModelSpec) -> int:
    """Parameter count of a spec's model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = spec.build()
    return sum(p.numel() for p in model.parameters())


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def seeded_randn(model: nn.Module, *shape: int, seed: int = 0) -> torch.Tensor:
    """Deterministic N(0, 1) inputs, drawn on the CPU (the same numbers on every device), on
    the model's device and in its dtype (so `bench --dtype bfloat16` feeds bf16 inputs)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x.to(device=model_device(model), dtype=model_dtype(model))
