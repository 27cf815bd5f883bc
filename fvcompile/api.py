"""`fvcompile.optimize`: compile a model through Inductor with fvcompile's passes."""
from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
from torch import nn

from fvcompile.backend import fvcompile_backend
from fvcompile.pass_manager import check_hooks, merged_config_patches
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
    include: str | tuple[str, ...] | list[str] = (),
    exclude: str | tuple[str, ...] | list[str] = (),
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
    options = dict(compile_kwargs.pop("options", None) or {})
    # Fail now on bad passes, not at the first call.
    resolved = resolve_passes(passes, torch.device("cpu"))
    check_hooks(resolved)
    merged_config_patches(resolved, options)

    report = OptimizeReport()
    options.update(passes=passes, codegen=codegen, report=report, include=include, exclude=exclude)
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
        _share_training_flag(optimized, model)
        optimized.compile(backend=backend, **compile_kwargs)
        optimized._compiled_call_impl = _report_eager_fallback(optimized._compiled_call_impl, report)
        if verify:
            optimized._compiled_call_impl = verify_first_call(model, optimized._compiled_call_impl)
        optimized.fvcompile_report = report
        return optimized

    compiled = torch.compile(model, backend=backend, **compile_kwargs)
    if verify:
        compiled = verify_first_call(model, compiled)
    compiled.fvcompile_report = report
    return compiled


def _recompile_limit_hits() -> int:
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason)


def _report_eager_fallback(call, report: OptimizeReport):
    """Say it when Dynamo runs the model eagerly because its recompile limit is reached.

    Dynamo keeps a bounded number of compiled versions per function (8 by default); each
    `optimize()` has a backend of its own, so the 9th model of one class optimized in a process
    gets none and runs uncompiled, with no error: the report and a warning say so instead.
    """
    @functools.wraps(call)
    def checked(*args, **kwargs):
        if report.graphs or report.ran_eagerly:
            return call(*args, **kwargs)
        out = call(*args, **kwargs)
        # Dynamo counts the limit once per function, then skips that function for good.
        if not report.graphs and _recompile_limit_hits():
            from torch._dynamo import config

            limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", "?")
            report.ran_eagerly = (f"Dynamo's recompile limit ({limit} compiled versions of this forward) is "
                                  "reached, so no pass applies: optimize fewer models of this class in one "
                                  "process, call torch._dynamo.reset(), or raise torch._dynamo.config.recompile_limit")
            warnings.warn(f"fvcompile: this model runs eagerly: {report.ran_eagerly}", stacklevel=2)
        return out

    return checked


def _share_training_flag(optimized: nn.Module, model: nn.Module) -> None:
    """Make `optimized.training` read and write `model.training`, as torch.compile's module does.

    The shallow copy shares submodules, hence their flags, but the top module's own `training`
    would be a second copy: `model.eval()` would leave `optimized` half in training mode (a
    forward that tests `self.training` itself would take the training branch)."""
    cls = type(model)

    def get_training(self) -> bool:
        return model.training

    def set_training(self, mode: bool) -> None:
        model.training = mode

    def reduce_ex(self, protocol):
        # Pickle and deep-copy as a plain module of the model's class (this class has no importable name).
        return _new_instance, (cls,), {**self.__getstate__(), "training": self.training}

    shared = type(cls.__name__, (cls,), {"training": property(get_training, set_training),
                                         "__reduce_ex__": reduce_ex,
                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    optimized.__dict__.pop("training", None)
    optimized.__class__ = shared


def _new_instance(cls: type):
    return cls.__new__(cls)
