"""`verify=True`: compare the compiled model with eager on its first input."""
from __future__ import annotations

import functools

import torch
from torch.utils._pytree import tree_leaves

# (atol, rtol) per dtype: compiled code reorders reductions and fuses, so bits differ.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-8, 1e-7),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
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
        if not e.is_floating_point():
            if not torch.equal(e, c):
                raise VerificationError(f"output {i}: integer outputs differ")
            continue
        atol, rtol = TOLERANCES.get(e.dtype, (1e-4, 1e-4))
        e64, c64 = e.detach().double(), c.detach().double()
        abs_err = (e64 - c64).abs()
        rel_err = abs_err / e64.abs().clamp_min(1e-12)
        if not torch.allclose(c64, e64, atol=atol, rtol=rtol):
            raise VerificationError(
                f"output {i} differs from eager beyond the {e.dtype} tolerance (atol={atol}, rtol={rtol}): "
                f"max abs error {abs_err.max().item():.3e}, max rel error {rel_err.max().item():.3e}. "
                "An approximate pass (sparse24, saap) changes outputs by design: verify exact passes only.")


def verify_first_call(eager_fn, compiled_fn):
    """Wrap `compiled_fn`: its first call also runs `eager_fn` on the same input and compares."""
    checked = False

    @functools.wraps(compiled_fn)
    def call(*args, **kwargs):
        nonlocal checked
        if checked:
            return compiled_fn(*args, **kwargs)
        checked = True
        # The same RNG state for both runs, so dropout and friends draw the same numbers.
        with torch.random.fork_rng(devices=[]):
            state = torch.random.get_rng_state()
            with torch.no_grad():
                expected = eager_fn(*args, **kwargs)
            torch.random.set_rng_state(state)
            out = compiled_fn(*args, **kwargs)
        compare(expected, out)
        return out

    return call
