"""The pass manager: runs fvcompile's ordered, named passes at Inductor's two hooks.

`HookPass` is the object installed at one hook (`joint_custom_pre_pass` or
`post_grad_custom_post_pass`) through `compile_fx(..., config_patches=...)`. It runs the
fvcompile passes of that hook in order, records what each did in the graph's report, and
then runs the pass the user had already installed at that hook (chained, not clobbered).
Its `uuid()` combines every pass's source and options, so Inductor's FX graph cache hits
when nothing changed and misses when an option did.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from fvcompile.passes.base import GraphPass, PassContext
from fvcompile.report import GraphReport, PassRun

try:  # a post-grad pass told whether the graph is an inference graph (not in every torch release)
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass
except ImportError:
    CustomInferenceAwareGraphPass = None

HOOK_CONFIG_KEYS = {"joint": "joint_custom_pre_pass", "post_grad": "post_grad_custom_post_pass"}


@dataclass
class PassScope:
    """Which modules the passes may touch (globs over dotted module names)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def check_hooks(passes: list[GraphPass]) -> None:
    """A pass whose hook is misspelt would never run while the report lists it: refuse it."""
    for p in passes:
        if p.hook not in HOOK_CONFIG_KEYS:
            raise ValueError(f"pass {p.name!r} has hook {p.hook!r}; a pass runs at one of: "
                             f"{', '.join(repr(h) for h in HOOK_CONFIG_KEYS)}")


def graph_kind(hook: str, graph: fx.Graph) -> str:
    """Tell joint / inference / forward / backward graphs apart by their inputs' names.

    AOTAutograd names trainable inputs `primals_*` and incoming gradients `tangents_*`;
    an inference graph has neither (`arg0_1`, ...).
    """
    names = [n.name for n in graph.find_nodes(op="placeholder")]
    has_tangents = any(n.startswith("tangents") for n in names)
    has_primals = any(n.startswith("primals") for n in names)
    if hook == "joint":
        return "joint" if has_tangents else "inference"
    if has_tangents:
        return "backward"
    return "forward" if has_primals else "inference"


def run_installed_passes(installed, graph: fx.Graph, hook: str, kind: str) -> None:
    """Run what was installed at a hook as Inductor would: one pass or a list of passes, and an
    inference-aware post-grad pass is told whether this is the inference graph."""
    for p in installed if isinstance(installed, (list, tuple)) else [installed]:
        if p is None:
            continue
        inference_aware = CustomInferenceAwareGraphPass and isinstance(p, CustomInferenceAwareGraphPass)
        if hook == "post_grad" and inference_aware:
            p(graph, is_inference=kind == "inference")
        else:
            p(graph)


def installed_uuid(installed) -> Any:
    """The cache key part of what was installed at a hook; None when a pass cannot be hashed."""
    uuids = []
    for p in installed if isinstance(installed, (list, tuple)) else [installed]:
        uuid = p.uuid() if hasattr(p, "uuid") else None
        if uuid is None:
            return None
        uuids.append(uuid)
    return uuids


def graph_device(graph: fx.Graph) -> torch.device:
    """The device of the graph's tensor inputs (CPU when it has none)."""
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


class HookPass(CustomGraphPass):
    def __init__(
        self,
        hook: str,
        passes: list[GraphPass],
        report: GraphReport,
        scope: PassScope,
        user_pass: Callable | None = None,
        dumper=None,
    ):
        self.hook = hook
        self.passes = passes
        self.report = report
        self.scope = scope
        self.user_pass = user_pass
        self.dumper = dumper  # fvcompile.dump.Dumper: the graph at the hook and after each pass

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        kind = graph_kind(self.hook, graph)
        ctx = PassContext(graph_kind=kind, device=graph_device(graph),
                          include=self.scope.include, exclude=self.scope.exclude)
        if self.dumper:
            self.dumper.write_hook_graph(self.hook, kind, gm)
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except Exception as e:
                raise RuntimeError(f"fvcompile pass {p.name!r} failed on the {kind} graph: {e}") from e
            graph.lint()
            gm.recompile()
            self.report.pass_runs.append(
                PassRun(p.name, self.hook, kind, time.perf_counter() - start, result))
            if self.dumper:
                self.dumper.write_pass_graph(kind, p.name, gm)
        if self.dumper:
            self.dumper.write_report()  # the backward graph comes after the backend returned
        if self.user_pass is not None:
            run_installed_passes(self.user_pass, graph, self.hook, kind)

    def uuid(self) -> Any:
        user_uuid = None
        if self.user_pass is not None:
            user_uuid = installed_uuid(self.user_pass)
            if user_uuid is None:
                return None  # the user's pass cannot be hashed: Inductor bypasses its cache
        h = hashlib.sha256()
        for part in [self.hook, repr(self.scope), repr(user_uuid), *(p.uuid() for p in self.passes)]:
            h.update(str(part).encode())
        return h.hexdigest()


def hook_patches(
    passes: list[GraphPass],
    report: GraphReport,
    scope: PassScope,
    user_passes: dict[str, Callable | None],
    dumper=None,
) -> dict[str, HookPass]:
    """Inductor config patches installing one HookPass per hook that has work to do (a dump
    counts: it shows every hook's graph). A hook with only the user's pass is left as it was."""
    patches = {}
    for hook, key in HOOK_CONFIG_KEYS.items():
        own = [p for p in passes if p.hook == hook]
        if own or dumper:
            patches[key] = HookPass(hook, own, report, scope, user_passes.get(key), dumper)
    return patches
