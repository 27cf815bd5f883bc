"""The `fvcompile` Dynamo backend: Inductor with fvcompile's passes at its hooks.

`torch.compile(model, backend="fvcompile", mode=..., options={...})` lands here. Options
that are fvcompile's own (`passes`, `codegen`, `dump_dir`, `include`, `exclude`) are taken
out; every other option is an Inductor config patch, as with `backend="inductor"`. The
passes' own config needs (`GraphPass.config_patches()`) and the `HookPass` of every hook
that has work join them: all reach `compile_fx(config_patches=...)` of this compile only.
`codegen=False` is the same compile with an inner compile that stops before lowering.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from torch._inductor import compile_fx as inductor_compile_fx

from fvcompile.aot_only import inner_compile_without_codegen
from fvcompile.checks import check_backend_options, check_mode
from fvcompile.hooks import CONFIG_KEYS, HOOKS
from fvcompile.pass_manager import PassScope, check_hooks, hook_patches, merged_config_patches
from fvcompile.passes import resolve_passes
from fvcompile.report import GraphReport, OptimizeReport

BACKEND_NAME = "fvcompile"
OWN_OPTIONS = ("passes", "codegen", "dump_dir", "include", "exclude", "report", "disable_caches")

# The report of graphs compiled through torch.compile(backend="fvcompile") (no report given).
_torch_compile_report = OptimizeReport()


def last_report() -> OptimizeReport:
    """What fvcompile did to every graph compiled through `torch.compile(backend="fvcompile")`
    since the last `fvcompile.reset()` (`optimize()` keeps its own: `model.fvcompile_report`)."""
    return _torch_compile_report


def reset() -> None:
    """Forget compiled graphs (`torch._dynamo.reset()`, and `generate`'s kept steps) and start a
    fresh `last_report()`."""
    global _torch_compile_report
    from fvcompile.generate import forget_compiled_steps

    torch._dynamo.reset()
    forget_compiled_steps()
    _torch_compile_report = OptimizeReport()


def _inputs_device(example_inputs) -> torch.device:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _compile_identity() -> tuple[str, str]:
    """Dynamo's compile id ("frame/attempt") and, on a recompilation, the guard that failed."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    reason = ""
    if compile_id is not None and compile_id.frame_compile_id:
        try:  # private, but it is where Dynamo keeps the reason it recompiled
            metrics = torch._dynamo.utils.get_metrics_context()._metrics
            reason = metrics.get("recompile_reason") or "recompiled (reason not recorded)"
        except Exception:
            reason = "recompiled (reason not recorded)"
    return str(compile_id) if compile_id is not None else "?", reason


def _globs(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)  # include="layers.0" is one glob


def _cache_hits() -> int:
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


# Dynamo's graph-break records seen already, by id (kept alive here, so no id is reused; Dynamo's
# list is cleared by torch._dynamo.reset() and may fill again before the next call).
_graph_breaks_seen: dict[int, object] = {}


def _new_graph_breaks() -> Counter:
    """Graph breaks Dynamo recorded since the previous call, by reason and place.

    Read from Dynamo's own record of every break (`graph_break_reasons`, what
    `torch._dynamo.explain` reads), not its counters: those file a data-dependent branch
    (`if tensor.sum() > 0:`) under "unimplemented", not "graph_break"."""
    from torch._dynamo.utils import graph_break_reasons

    new = [r for r in graph_break_reasons if id(r) not in _graph_breaks_seen]
    _graph_breaks_seen.update((id(r), r) for r in new)
    return Counter(_describe_break(r) for r in new)


def _describe_break(reason) -> str:
    lines = [line.strip() for line in reason.reason.splitlines() if line.strip()]
    text = lines[0] if lines else "graph break"
    explanation = next((line for line in lines if line.startswith("Explanation:")), "")
    if explanation:
        text += f" ({explanation.removeprefix('Explanation:').strip()})"
    if text.startswith("generic_jump"):  # Dynamo's words for a branch on a tensor's value
        text = "data-dependent branching (a Python `if` on a tensor's value)"
    where = reason.user_stack[-1] if reason.user_stack else None
    return f"{text} at {where.filename}:{where.lineno}" if where else text


RANDOM_OP_WORDS = ("dropout", "rand", "bernoulli", "multinomial", "normal", "poisson")


def _random_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The random ops of Dynamo's graph: compiled, they draw other numbers than eager."""
    names = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if any(word in name.lower() for word in RANDOM_OP_WORDS):
                names.add(name)
    return sorted(names)


def _counting_calls(compiled, report: OptimizeReport):
    """`compiled`, counting its calls in the report: a model call that ran no compiled graph
    ran eagerly (fvcompile.api reports it)."""
    def run(*args):
        report.graph_calls += 1
        return compiled(*args)

    return run


def fvcompile_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None,
                      options: dict | None = None):
    options = dict(options or {})
    own = {k: options.pop(k) for k in OWN_OPTIONS if k in options}
    check_backend_options(own, {k: v for k, v in options.items() if k not in CONFIG_KEYS})
    check_mode(mode)
    report: OptimizeReport = own.get("report") or _torch_compile_report
    codegen = own.get("codegen", True)
    passes = [p for p in resolve_passes(own.get("passes", "auto"), _inputs_device(example_inputs))
              if p.wanted(gm, example_inputs)]
    check_hooks(passes)
    report.passes = [p.name for p in passes]
    report.approximate = [p.name for p in passes if not p.exact]

    graph_report = _new_graph_report(gm, report, codegen)
    dumper = None
    if own.get("dump_dir"):
        from fvcompile.dump import Dumper

        dumper = Dumper(own["dump_dir"], graph_report.compile_id, report)
        dumper.write_dynamo_graph(gm)

    config_patches = _config_patches(passes, own, options, mode, graph_report, dumper)
    if codegen:
        inner_compile = inductor_compile_fx.compile_fx_inner
    else:
        inner_compile = inner_compile_without_codegen
        skipped = [p.name for p in passes if HOOKS[p.hook].stage == "scheduler"]
        if skipped:
            graph_report.notes.append(f"codegen=False: no scheduler, so {', '.join(skipped)} did not run")
    hits_before = _cache_hits()
    compiled = inductor_compile_fx.compile_fx(gm, example_inputs, config_patches=config_patches,
                                              inner_compile=dumper.wrap_inner_compile(inner_compile)
                                              if dumper else inner_compile)
    graph_report.cache_hit = _cache_hits() > hits_before
    if dumper:
        dumper.write_report()
    return _counting_calls(compiled, report)


def _new_graph_report(gm: torch.fx.GraphModule, report: OptimizeReport, codegen: bool) -> GraphReport:
    """The report of one graph Dynamo handed over: its compile id, why it was recompiled, the
    graph breaks since the last one, and its random ops."""
    compile_id, recompile_reason = _compile_identity()
    graph_report = GraphReport(compile_id, codegen, len(gm.graph.nodes), recompile_reason)
    report.graphs.append(graph_report)
    for reason, count in _new_graph_breaks().items():
        report.graph_breaks[reason] = report.graph_breaks.get(reason, 0) + count
    graph_report.random_ops = _random_ops(gm)
    return graph_report


def _config_patches(passes, own: dict, options: dict, mode, graph_report: GraphReport, dumper) -> dict:
    """This compile's Inductor config: the mode's, the user's options, the passes' needs, and a
    HookPass at every hook with work (the user's own pass at a hook chained after ours)."""
    # The user's own passes at our hooks: from options= first, else Inductor's current config.
    user_passes = {key: options.pop(key, getattr(inductor_config, key)) for key in CONFIG_KEYS}
    scope = PassScope(_globs(own.get("include", ())), _globs(own.get("exclude", ())))
    patches = {**(torch._inductor.list_mode_options(mode) if mode else {}), **options}
    patches.update(merged_config_patches(passes, options))
    # Hooks with no fvcompile pass keep the user's pass as it was.
    patches.update({k: v for k, v in user_passes.items() if v is not None})
    patches.update(hook_patches(passes, graph_report, scope, user_passes, dumper))
    if dumper or own.get("disable_caches") or not graph_report.codegen:
        # The passes must run to be seen; a codegen=False graph is FX code, which no cache keeps.
        patches["force_disable_caches"] = True
    if dumper:
        # Which FX nodes each generated kernel came from, for the dump's provenance files.
        patches["trace.provenance_tracking_level"] = 1
    return patches


def register_backend() -> None:
    """Register `backend="fvcompile"` unless it is registered already (the entry point of the
    `torch_dynamo_backends` group imports this package; a second registration would fail)."""
    from torch._dynamo import list_backends, register_backend as register

    if BACKEND_NAME not in list_backends(exclude_tags=()):
        register(name=BACKEND_NAME)(fvcompile_backend)
