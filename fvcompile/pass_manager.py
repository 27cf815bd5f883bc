"""The pass manager: runs fvcompile's ordered, named passes at Inductor's hooks.

`HookPass` is the object installed at one hook (fvcompile/hooks.py names them all) through
`compile_fx(..., config_patches=...)`. It builds the `PassContext` of the graph it is given,
runs the fvcompile passes of that hook in order, records what each did (and the graph's op
counts before and after) in the graph's report, and then runs the pass the user had already
installed at that hook (chained, not clobbered). Its `uuid()` combines every pass's source and
options, so Inductor's FX graph cache hits when nothing changed and misses when an option did.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, CustomSchedulerPass

from fvcompile.hooks import HOOKS
from fvcompile.passes.base import GraphPass, PassContext
from fvcompile.passes.graph_utils import op_counts
from fvcompile.report import GraphReport, HookVisit, PassRun

try:  # a post-grad pass told whether the graph is an inference graph (not in every torch release)
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass
except ImportError:
    CustomInferenceAwareGraphPass = CustomGraphPass


@dataclass
class PassScope:
    """Which modules the passes may touch (globs over dotted module names)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def check_hooks(passes: list[GraphPass]) -> None:
    """A pass whose hook is misspelt would never run while the report lists it: refuse it."""
    for p in passes:
        if p.hook not in HOOKS:
            raise ValueError(f"pass {p.name!r} has hook {p.hook!r}; a pass runs at one of: "
                             f"{', '.join(repr(h) for h in HOOKS)} (fvcompile/hooks.py)")


def merged_config_patches(passes: list[GraphPass], user_options: dict) -> dict[str, Any]:
    """The Inductor config every pass declared, for this compile; a key two passes (or a pass
    and the user's options=) set differently is an error naming both."""
    merged: dict[str, tuple[str, Any]] = {}
    for p in passes:
        for key, value in p.config_patches().items():
            if key in user_options and user_options[key] != value:
                raise ValueError(f"pass {p.name!r} needs Inductor config {key}={value!r}, but options= sets "
                                 f"{key}={user_options[key]!r}: drop that option or the pass")
            if key in merged and merged[key][1] != value:
                raise ValueError(f"passes {merged[key][0]!r} and {p.name!r} need Inductor config {key} set "
                                 f"differently ({merged[key][1]!r} vs {value!r}): run them in separate compiles")
            merged[key] = (p.name, value)
    return {key: value for key, (_, value) in merged.items()}


def _has_tangents(graph: fx.Graph) -> bool:
    """Whether AOTAutograd marked an input as an incoming gradient (its input descriptor)."""
    from torch._functorch._aot_autograd.descriptors import TangentAOTInput

    for node in graph.find_nodes(op="placeholder"):
        desc = node.meta.get("desc")
        if isinstance(desc, TangentAOTInput) or (desc is None and node.name.startswith("tangents")):
            return True
    return False


def graph_kind(stage: str, graph: fx.Graph, is_inference: bool | None = None) -> str:
    """"joint", "inference", "forward" or "backward", from what Inductor and AOTAutograd say:
    post-grad hooks are told `is_inference` by Inductor; a joint graph and a backward graph
    have inputs that AOTAutograd's descriptors mark as tangents."""
    if stage == "joint":
        return "joint" if _has_tangents(graph) else "inference"
    if is_inference:
        return "inference"
    if _has_tangents(graph):
        return "backward"
    if is_inference is None:  # a torch without inference-aware passes: the partitioner tags training graphs
        tagged = any("partitioner_tag" in n.meta for n in graph.find_nodes(op="placeholder"))
        return "forward" if tagged else "inference"
    return "forward"


def scheduler_graph_kind() -> str:
    from torch._inductor.virtualized import V

    if V.graph.is_inference:
        return "inference"
    return "backward" if V.graph.is_backward else "forward"


def collective_groups(graph: fx.Graph) -> tuple[str, ...]:
    """The process groups (by name) that the graph's functional collectives use."""
    groups = []
    for node in graph.nodes:
        if node.op == "call_function" and getattr(node.target, "namespace", "") == "_c10d_functional":
            schema_args = [a.name for a in node.target._schema.arguments]
            if "group_name" in schema_args:
                i = schema_args.index("group_name")
                name = node.args[i] if i < len(node.args) else node.kwargs.get("group_name")
                if name not in groups:
                    groups.append(name)
    return tuple(groups)


def rank_and_world_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_installed_passes(installed, graph, stage: str, kind: str):
    """Run what was installed at a hook as Inductor would: one pass or a list of passes; an
    inference-aware post-grad pass is told whether this is the inference graph; a scheduler
    pass returns the new node list."""
    for p in installed if isinstance(installed, (list, tuple)) else [installed]:
        if p is None:
            continue
        if stage == "scheduler":
            graph = p(graph)
        elif stage == "post_grad" and isinstance(p, CustomInferenceAwareGraphPass) \
                and CustomInferenceAwareGraphPass is not CustomGraphPass:
            p(graph, is_inference=kind == "inference")
        else:
            p(graph)
    return graph


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


def _scheduler_listing(nodes: list) -> str:
    """One line per scheduler node (name, type, the nodes fused into it), then Inductor's own
    description of it indented below (its reads, writes and loop body: the IR before or after
    fusion, as TORCH_COMPILE_DEBUG's ir_pre_fusion.txt / ir_post_fusion.txt show it)."""
    lines = []
    for node in nodes:
        inner = getattr(node, "snodes", None)
        parts = f" [{', '.join(s.get_name() for s in inner)}]" if inner and len(inner) > 1 else ""
        lines.append(f"{node.get_name()}: {type(node).__name__}{parts}")
        try:
            detail = node.debug_str()
        except Exception as e:  # a node Inductor cannot describe: its name line stays
            detail = f"(no description: {type(e).__name__})"
        lines.extend("    " + line for line in detail.rstrip().splitlines())
    return "\n".join(lines) + "\n"


class HookPass(CustomInferenceAwareGraphPass, CustomSchedulerPass):
    """fvcompile's passes at one hook, with the context of the compile they run in."""

    def __init__(
        self,
        hook: str,
        passes: list[GraphPass],
        report: GraphReport,
        scope: PassScope,
        store: dict,
        user_pass: Callable | None = None,
        dumper=None,
    ):
        self.hook = hook
        self.stage = HOOKS[hook].stage
        self.passes = passes
        self.report = report
        self.scope = scope
        self.store = store  # one per compile: shared by the forward and backward graphs
        self.user_pass = user_pass
        self.dumper = dumper  # fvcompile.dump.Dumper: the graph at the hook and after each pass

    def __call__(self, graph, is_inference: bool | None = None):
        if self.stage == "scheduler":
            return self._run_on_nodes(graph)
        gm = graph.owning_module
        kind = graph_kind(self.stage, graph, is_inference)
        ctx = self._context(kind, graph_device(graph), collective_groups(graph))
        self.report.hooks.append(HookVisit(self.hook, kind, len(graph.nodes)))
        if self.dumper:
            self.dumper.write_hook_graph(self.hook, kind, gm)
        for p in self.passes:
            if not p.applies_to(ctx):
                continue
            before = op_counts(graph)
            result, seconds = self._run(p, gm, ctx)
            graph.lint()
            gm.recompile()
            self.report.pass_runs.append(PassRun(p.name, self.hook, kind, seconds, result, dict(before),
                                                 dict(op_counts(graph))))
            if self.dumper:
                self.dumper.write_pass_graph(kind, p.name, gm)
        if self.dumper:
            self.dumper.write_report()  # the backward graph comes after the backend returned
        if self.user_pass is not None:
            run_installed_passes(self.user_pass, graph, self.stage, kind)

    def _run_on_nodes(self, nodes: list) -> list:
        kind = scheduler_graph_kind()
        ctx = self._context(kind, _scheduler_device())
        nodes = list(nodes)
        self.report.hooks.append(HookVisit(self.hook, kind, len(nodes)))
        if self.dumper:
            self.dumper.write_text(f"{kind}_at_{self.hook}_hook.txt", _scheduler_listing(nodes))
        for p in self.passes:
            result, seconds = self._run(p, nodes, ctx)
            self.report.pass_runs.append(PassRun(p.name, self.hook, kind, seconds, result))
            if self.dumper:
                self.dumper.write_text(f"{kind}_{p.name}_after.txt", _scheduler_listing(nodes))
        if self.user_pass is not None:
            nodes = run_installed_passes(self.user_pass, nodes, self.stage, kind)
        return nodes

    def _context(self, kind: str, device: torch.device, process_groups: tuple[str, ...] = ()) -> PassContext:
        rank, world_size = rank_and_world_size()
        return PassContext(graph_kind=kind, device=device, include=self.scope.include, exclude=self.scope.exclude,
                           hook=self.hook, rank=rank, world_size=world_size, process_groups=process_groups,
                           store=self.store)

    @staticmethod
    def _run(p: GraphPass, graph, ctx: PassContext):
        start = time.perf_counter()
        try:
            result = p.run(graph, ctx)
        except Exception as e:
            raise RuntimeError(f"fvcompile pass {p.name!r} failed on the {ctx.graph_kind} graph "
                               f"at the {ctx.hook!r} hook: {e}") from e
        return result, time.perf_counter() - start

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


def _scheduler_device() -> torch.device:
    from torch._inductor.virtualized import V

    devices = [d for d in V.graph.device_types if d != "cpu"]
    return torch.device(devices[0] if devices else "cpu")


def hook_patches(
    passes: list[GraphPass],
    report: GraphReport,
    scope: PassScope,
    user_passes: dict[str, Callable | None],
    dumper=None,
) -> dict[str, HookPass]:
    """Inductor config patches installing one HookPass per hook that has work to do (a dump
    counts: it shows every hook's graph). A hook with only the user's pass is left as it was.
    Every HookPass of one compile shares one store."""
    patches, store = {}, {}
    for name, hook in HOOKS.items():
        own = [p for p in passes if p.hook == name]
        if own or dumper:
            patches[hook.config_key] = HookPass(name, own, report, scope, store,
                                                user_passes.get(hook.config_key), dumper)
    return patches
