"""Whether a compiled variant computes what eager computes: the pass-rate check of one cell.

Inference compares the model's outputs; training compares the loss and every parameter's
gradient after one step from the same weights. Compiled code reorders reductions and fuses, so
the check is a relative L2 error per output within a per-dtype tolerance, not bit equality.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

# Largest relative L2 error (||compiled - eager|| / ||eager||) of any output or gradient that
# still counts as a match: a few units of the dtype's rounding, grown by a compiled reduction order.
TOLERANCES = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def reference_outputs(spec, model: nn.Module, compiled, task: str, inputs) -> list[torch.Tensor]:
    """The outputs one call gives, as a flat list of tensors: the model's outputs (inference),
    or the loss and then each parameter's gradient by name (training; `compiled` shares the
    parameters of `model`, whose gradients are read)."""
    torch.manual_seed(0)
    if task == "infer":
        with torch.no_grad():
            out = compiled(*inputs)
        return [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    for p in model.parameters():
        p.grad = None
    loss = spec.train_step(compiled, inputs)
    loss.backward()
    grads = [p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]
    return [loss.detach(), *[g.detach() for g in grads]]


def relative_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """The largest relative L2 error over the outputs; inf where shapes or counts differ or a
    value is not finite where eager's is."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for e, a in zip(expected, actual):
        if e.shape != a.shape:
            return float("inf")
        if not (e.is_floating_point() or e.is_complex()):
            worst = max(worst, 0.0 if torch.equal(e, a) else float("inf"))
            continue
        e64, a64 = e.double(), a.double()
        if not torch.isfinite(a64).all() and torch.isfinite(e64).all():
            return float("inf")
        diff = torch.linalg.vector_norm(torch.nan_to_num(a64 - e64))
        scale = torch.linalg.vector_norm(torch.nan_to_num(e64)).clamp_min(1e-30)
        worst = max(worst, (diff / scale).item())
    return worst


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, 1e-3)


def random_modules(model: nn.Module) -> list[str]:
    """Modules that draw random numbers in the model's current mode (dropout while training):
    compiled code draws other numbers than eager, so outputs are not comparable there."""
    if not model.training:
        return []
    return sorted({type(m).__name__ for m in model.modules()
                   if "Dropout" in type(m).__name__ and getattr(m, "p", 0)})


def verdict(error: float, dtype: torch.dtype, *, approximate: list[str], random: list[str]) -> tuple[str, str]:
    """(status, reason) of a cell that compiled and ran, from its error against eager.

    approximate: approximate passes that rewrote the graph (sparse24, fp8_dense): they change
        outputs by design; the cell passes when its outputs are finite, and says by how much.
    random: the model's random modules in this task: outputs are checked finite only."""
    tol = tolerance(dtype)
    if approximate:
        if error == float("inf"):
            return "mismatch", f"approximate pass(es) {', '.join(approximate)}: outputs not finite or misshapen"
        return "approximate", f"approximate pass(es) {', '.join(approximate)}: relative error {error:.2e} vs eager"
    if error <= tol:
        return "ok", ""
    if random and error != float("inf"):
        return "ok", f"not compared: {', '.join(random)} draws other random numbers when compiled"
    return "mismatch", f"differs from eager: relative error {error:.2e} > {tol:.0e} ({dtype})"
