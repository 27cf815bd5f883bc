"""`verify=True`: compare the compiled model with eager on its first input."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

# (atol, rtol) per dtype: compiled code reorders reductions and fuses, so bits differ.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-8, 1e-7),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.complex64: (1e-4, 1e-4),
    torch.complex128: (1e-8, 1e-7),
}


class VerificationError(AssertionError):
    pass


def compare(eager_out, compiled_out) -> None:
    """Raise VerificationError naming the worst max abs/rel error beyond tolerance."""
    eager_leaves, compiled_leaves = tree_leaves(eager_out), tree_leaves(compiled_out)
    if len(eager_leaves) != len(compiled_leaves):
        raise VerificationError(f"compiled output has {len(compiled_leaves)} leaves, eager {len(eager_leaves)}")
    for i, (e, c) in enumerate(zip(eager_leaves, compiled_leaves)):
        if not isinstance(e, torch.Tensor):
            continue
        if e.shape != c.shape:
            raise VerificationError(f"output {i}: shape {tuple(c.shape)} compiled vs {tuple(e.shape)} eager")
        if e.dtype != c.dtype:
            raise VerificationError(f"output {i}: dtype {c.dtype} compiled vs {e.dtype} eager")
        if not (e.is_floating_point() or e.is_complex()):
            if not torch.equal(e, c):
                raise VerificationError(f"output {i}: integer outputs differ")
            continue
        atol, rtol = TOLERANCES.get(e.dtype, (1e-4, 1e-4))
        wide = torch.complex128 if e.is_complex() else torch.float64
        e64, c64 = e.detach().to(wide), c.detach().to(wide)
        if not torch.allclose(c64, e64, atol=atol, rtol=rtol, equal_nan=True):
            # NaN and inf where eager has them too are no error; elsewhere they are the worst one.
            same = (e64 == c64) | (e64.isnan() & c64.isnan())
            abs_err = torch.where(same, 0.0, (e64 - c64).abs().nan_to_num(nan=float("inf")))
            rel_err = abs_err / e64.abs().clamp_min(1e-12)
            raise VerificationError(
                f"output {i} differs from eager beyond the {e.dtype} tolerance (atol={atol}, rtol={rtol}): "
                f"max abs error {abs_err.max().item():.3e}, max rel error {rel_err.max().item():.3e}.")


def likely_cause(report) -> str:
    """Why compiled and eager outputs differ, from what the report saw: the passes that rewrote
    something, else random ops (which Inductor draws from its own generator), else Inductor."""
    rewrote = [name for name in report.passes if report.rewritten(name)]
    if rewrote:
        approximate = [n for n in rewrote if n in report.approximate]
        if approximate:
            return (f"The approximate pass(es) {', '.join(approximate)} rewrote the graph and change outputs "
                    "by design: verify=True checks exact passes; test approximate ones against their reference.")
        return (f"The pass(es) {', '.join(rewrote)} rewrote the graph: run without them (passes=[]) to see "
                "whether they cause it.")
    random_ops = sorted({op for g in report.graphs for op in g.random_ops})
    if random_ops:
        return (f"No pass rewrote anything, but the graph has random ops ({', '.join(random_ops)}), which "
                "compiled code draws from another generator than eager: verify in eval mode (model.eval()), "
                "or compare seeded with options={'fallback_random': True}.")
    return ("No pass rewrote anything: Inductor's code itself differs from eager here; check the tolerance "
            "for your dtype, or report it with a repro (fvcompile inspect shows the generated code).")


def verify_first_call(eager_fn, compiled_fn, report=None):
    """Wrap `compiled_fn`: its first call also runs `eager_fn` on the same input and compares.

    Eager runs first, on copies of the tensor inputs, and the module's buffers are put back
    after it: the call then leaves the state one compiled call leaves (BatchNorm's running
    statistics updated once, an input mutated in place once)."""
    checked = False

    @functools.wraps(compiled_fn)
    def call(*args, **kwargs):
        nonlocal checked
        if checked:
            return compiled_fn(*args, **kwargs)
        checked = True
        buffers = [(b, b.clone()) for b in eager_fn.buffers()] if isinstance(eager_fn, nn.Module) else []
        # The same RNG state for both runs. Compiled random ops draw other numbers than eager
        # (Inductor's own generator), so verify a model in eval mode, or without dropout.
        with torch.random.fork_rng(devices=[]):
            state = torch.random.get_rng_state()
            with torch.no_grad():
                expected = eager_fn(*_copies(args), **_copies(kwargs))
                for b, saved in buffers:
                    b.copy_(saved)
            torch.random.set_rng_state(state)
            out = compiled_fn(*args, **kwargs)
        try:
            compare(expected, out)
        except VerificationError as e:
            if report is None:
                raise
            # What most likely makes them differ, with the way out: read from the report only now.
            raise VerificationError(f"{e} {likely_cause(report)}") from None
        return out

    return call


def _copies(tree):
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)
