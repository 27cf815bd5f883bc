"""Checks shared by the tests, the benchmarks and the GPU check script."""
from __future__ import annotations

import torch

import fvcompile
from fvcompile.models import get


def assert_train_step_parity(name: str, device: str = "cpu", atol: float = 1e-5, rtol: float = 1e-4,
                             **optimize_kwargs) -> tuple[float, float]:
    """One training step of registry model `name`, optimized vs eager: the loss and every
    parameter's gradient must agree. Returns (optimized loss, eager loss)."""
    spec = get(name)
    torch.manual_seed(0)
    model = spec.build().to(device)
    batch = spec.train_batch(model, 2)
    loss_optimized = spec.train_step(fvcompile.optimize(model, **optimize_kwargs), batch)
    loss_optimized.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss_eager = spec.train_step(model, batch)
    loss_eager.backward()
    torch.testing.assert_close(loss_optimized, loss_eager, atol=atol, rtol=rtol)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=atol, rtol=rtol * 10, msg=n)
    return loss_optimized.item(), loss_eager.item()
