"""`fvcompile.optimize`: compile a model through Inductor with fvcompile's passes."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fvcompile.backend import fvcompile_backend
from fvcompile.passes import resolve_passes
from fvcompile.report import OptimizeReport
from fvcompile.verify import verify_first_call


def optimize(
    model: nn.Module | Any,
    *,
    passes="auto",
    dump_dir: str | None = None,
    verify: bool = False,
    codegen: bool = True,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    **compile_kwargs,
):
    """Compile `model` with TorchInductor and fvcompile's graph passes.

    passes: "auto" (exact passes that pay off on the inputs' device), a list of pass names,
        or pass objects carrying their options, e.g. `[Sparse24(emulate=False)]`.
    dump_dir: write every graph before/after each pass and Inductor's code there (see `inspect`).
    verify: on the first call, run eager too and raise if outputs differ beyond tolerance.
    codegen: False runs the same passes on the same graphs without Inductor's code generation.
    include / exclude: module-name globs limiting where passes rewrite ("layers.0", "*.feed_forward").
    compile_kwargs: passed to `torch.compile` (fullgraph=, dynamic=, mode=, options=...).

    Returns the compiled module: it shares parameters with `model` (which stays eager), its
    `state_dict()` keys are the model's own, and `.fvcompile_report` says what each pass did.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"fvcompile.optimize expects an nn.Module or a callable, got {type(model).__name__}")
    resolve_passes(passes, torch.device("cpu"))  # fail now on unknown names, not at first call

    report = OptimizeReport()
    options = dict(compile_kwargs.pop("options", None) or {})
    options.update(passes=passes, codegen=codegen, report=report,
                   include=tuple(include), exclude=tuple(exclude))
    if dump_dir is not None:
        options["dump_dir"] = str(dump_dir)
    if verify:
        options["disable_caches"] = True  # verify checks the passes; a cache hit would skip them
    mode = compile_kwargs.pop("mode", None)

    def backend(gm, example_inputs):
        return fvcompile_backend(gm, example_inputs, mode=mode, options=options)

    if isinstance(model, nn.Module):
        # A shallow copy shares parameters, buffers and submodules with `model` but compiles
        # on its own, so state_dict keys stay the model's own and `model` itself stays eager.
        optimized = copy.copy(model)
        optimized.compile(backend=backend, **compile_kwargs)
        if verify:
            optimized._compiled_call_impl = verify_first_call(model, optimized._compiled_call_impl)
        optimized.fvcompile_report = report
        return optimized

    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    if verify:
        compiled = verify_first_call(model, compiled)
    compiled.fvcompile_report = report
    return compiled
