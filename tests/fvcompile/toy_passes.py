"""Small passes for testing the pass manager (not part of the product)."""
from __future__ import annotations

import torch
from torch import fx

from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.passes.graph_utils import module_path

aten = torch.ops.aten


class ReluToClampPass(GraphPass):
    """Exact rewrite: relu(x) -> clamp_min(x, 0). Records the graph kinds it was shown."""

    name = "relu_to_clamp"
    hook = "joint"

    def __init__(self, hook: str = "joint", tag: int = 0):
        self.hook = hook
        self.tag = tag  # an option that changes nothing but the uuid (cache tests)
        self.seen_kinds: list[str] = []

    def options(self):
        return {"hook": self.hook, "tag": self.tag}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.seen_kinds.append(ctx.graph_kind)
        result = PassResult()
        for node in list(gm.graph.find_nodes(op="call_function", target=aten.relu.default)):
            module = module_path(node)
            if not ctx.module_allowed(module):
                result.skipped.append(Site(node.name, module, "excluded by module filter"))
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(aten.clamp_min.default, (node.args[0], 0))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            result.rewritten.append(Site(node.name, module, "relu -> clamp_min"))
        return result


class RecordingPass(GraphPass):
    """Changes nothing; keeps the context and the graph's text it was given at each call."""

    def __init__(self, hook: str = "post_grad", name: str = "recording"):
        self.hook = hook
        self.name = name
        self.contexts: list[PassContext] = []
        self.graphs: list[str] = []

    def options(self):
        return {"hook": self.hook}

    def run(self, graph, ctx: PassContext) -> PassResult:
        self.contexts.append(ctx)
        if isinstance(graph, fx.GraphModule):
            self.graphs.append(graph.print_readable(print_output=False, include_stride=True, include_device=True))
        else:  # scheduler nodes
            self.graphs.append("\n".join(node.get_name() for node in graph))
        return PassResult()


class BreakNumericsPass(GraphPass):
    """Wrong on purpose: relu(x) -> abs(x). For verify=True tests."""

    name = "break_numerics"
    hook = "post_grad"
    exact = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.find_nodes(op="call_function", target=aten.relu.default):
            node.target = aten.abs.default
            result.rewritten.append(Site(node.name))
        return result


class Mlp(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.down = torch.nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class TwoMlps(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.first = Mlp(dim)
        self.second = Mlp(dim)

    def forward(self, x):
        return self.second(self.first(x))
