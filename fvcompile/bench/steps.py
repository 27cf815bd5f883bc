"""Building what a cell runs: the model (seeded: every variant gets the same weights), its
inputs, the compiled variant, and one step (a forward under no_grad, or forward + backward)."""
from __future__ import annotations

import torch
from torch import nn

from fvcompile.bench.grid import Variant


def build_model(spec, task: str, device: str, dtype: str) -> nn.Module:
    """The spec's model, seeded, on `device` in `dtype`; eval mode for inference."""
    torch.manual_seed(0)
    model = spec.build().to(device=torch.device(device), dtype=getattr(torch, dtype))
    return model.eval() if task == "infer" else model.train()


def make_inputs(spec, model: nn.Module, task: str, batch_size: int):
    """The forward's arguments (inference) or a training batch, seeded."""
    torch.manual_seed(0)
    return spec.example_inputs(model, batch_size) if task == "infer" else spec.train_batch(model, batch_size)


def compile_variant(model: nn.Module, variant: Variant):
    """The module a variant runs: the model itself (eager), `torch.compile(model)` (stock
    Inductor) or `fvcompile.optimize(model, passes=...)`. Compiles lazily, at the first call."""
    if variant.mode == "eager":
        return model
    if variant.mode == "inductor":
        return torch.compile(model)
    if variant.mode == "fvcompile":
        import fvcompile

        return fvcompile.optimize(model, passes=variant.pass_argument())
    raise ValueError(f"unknown mode {variant.mode!r}")


def make_step(spec, model: nn.Module, runner, task: str, inputs):
    """One step of `runner` (the variant's module): the forward under no_grad (inference), or
    the training step's loss and its backward, gradients cleared first as a training loop does."""
    if task == "infer":
        def infer_step():
            with torch.no_grad():
                return runner(*inputs)
        return infer_step
    params = list(model.parameters())

    def train_step():
        for p in params:
            p.grad = None
        loss = spec.train_step(runner, inputs)
        loss.backward()
        return loss
    return train_step
