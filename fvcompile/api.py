"""`fvcompile.optimize`: compile a model through Inductor with fvcompile's passes."""
from __future__ import annotations

import copy
import functools
import types
import warnings
from typing import Any

import torch
from torch import nn

from fvcompile.backend import fvcompile_backend
from fvcompile.checks import (check_dump_dir, check_flag, check_inductor_options, check_mode, check_model,
                              checked_globs)
from fvcompile.hooks import CONFIG_KEYS
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
    check_model(model)
    include, exclude = checked_globs("include", include), checked_globs("exclude", exclude)
    options = dict(compile_kwargs.pop("options", None) or {})
    _check_arguments(passes, verify, codegen, dump_dir, compile_kwargs.get("mode"), options)

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
        optimized._compiled_call_impl = _compile_module_call(optimized, backend, compile_kwargs)
        optimized._compiled_call_impl = _report_eager_calls(optimized._compiled_call_impl, report)
        if verify:
            optimized._compiled_call_impl = verify_first_call(model, optimized._compiled_call_impl, report)
        optimized.fvcompile_report = report
        return optimized

    compiled = _report_eager_calls(torch.compile(model, backend=backend, **compile_kwargs), report)
    if verify:
        compiled = verify_first_call(model, compiled, report)
    compiled.fvcompile_report = report
    return compiled


def _check_arguments(passes, verify, codegen, dump_dir, mode, options: dict) -> None:
    """Everything optimize is given, checked when it is called, not at the first call."""
    check_flag("verify", verify)
    check_flag("codegen", codegen)
    if dump_dir is not None:
        check_dump_dir(dump_dir)
    if not isinstance(mode or "", str):
        raise TypeError(f"mode= takes a torch.compile mode name, got {mode!r}")
    check_mode(mode)
    check_inductor_options({k: v for k, v in options.items() if k not in CONFIG_KEYS})
    resolved = resolve_passes(passes, torch.device("cpu"))
    check_hooks(resolved)
    merged_config_patches(resolved, options)


def _compile_module_call(module: nn.Module, backend, compile_kwargs: dict):
    """The module's call, compiled, as `torch.compile(module)` compiles it.

    `module.compile()` compiles `_call_impl`, whose frame Dynamo skips (it lives in torch.nn):
    the model's own `forward` is then caught as the next frame, but a `forward` of torch.nn
    itself (nn.Sequential, nn.Linear, nn.TransformerEncoderLayer) is skipped too, and the module
    silently ran eagerly. For those, a frame of ours calls `_call_impl`, and Dynamo inlines it."""
    from torch._dynamo import trace_rules

    forward = module.forward
    if isinstance(forward, types.MethodType) and trace_rules.check(forward):
        def call_module(*args, **kwargs):
            return module._call_impl(*args, **kwargs)

        return torch.compile(call_module, backend=backend, **compile_kwargs)
    return torch.compile(module._call_impl, backend=backend, **compile_kwargs)


def _recompile_limit_hits() -> int:
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason)


def _report_eager_calls(call, report: OptimizeReport):
    """Say it in the report, and warn once, when a call ran with no compiled graph at all.

    The backend counts every call of the graphs it compiled (`report.graph_calls`): a call
    that ran none of them ran eagerly, with no pass applied. The usual cause is Dynamo's
    recompile limit: it keeps a bounded number of compiled versions per function (8 by
    default), so a 9th input shape with `dynamic=False`, or a 9th model of one class optimized
    in one process, runs uncompiled, with no error."""
    limit_hits_before = _recompile_limit_hits()

    @functools.wraps(call)
    def checked(*args, **kwargs):
        calls_before = report.graph_calls
        out = call(*args, **kwargs)
        if report.graph_calls == calls_before:
            report.eager_calls += 1
            if not report.ran_eagerly:
                report.ran_eagerly = _why_no_graph(limit_hits_before)
                warnings.warn(f"fvcompile: a call ran eagerly, no pass applied: {report.ran_eagerly}", stacklevel=2)
        return out

    return checked


def _why_no_graph(limit_hits_before: int) -> str:
    if _recompile_limit_hits() > limit_hits_before:
        from torch._dynamo import config

        limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", "?")
        return (f"Dynamo's recompile limit ({limit} compiled versions of one function) is reached: mark the "
                "changing sizes dynamic (dynamic=True or torch._dynamo.mark_dynamic), optimize fewer models "
                "of one class in a process, call torch._dynamo.reset(), or raise torch._dynamo.config.recompile_limit")
    return ("Dynamo made no graph for this call (nothing to compile, or it skipped the function): "
            "torch._dynamo.explain(model)(*inputs) says why")


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
