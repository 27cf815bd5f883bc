"""`codegen=False`: Inductor's whole graph pipeline, without its code generation.

`compile_fx` runs as it always does (decompositions, Inductor's joint passes and the custom
joint hooks, its partitioner, and per graph the steps before lowering: view-to-reshape, fake
tensor propagation, Inductor's post-grad passes and the custom post-grad hooks). Only the last
step changes: instead of lowering the post-grad graph to C++/Triton, `inner_compile_without_codegen`
returns it to run as plain FX code. So a pass sees exactly the graph it would see under real
codegen, at a fraction of its compile time (bench/README.md). The scheduler hooks (pre/post fusion) need
lowering: they do not run here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx
from torch._inductor.compile_fx import _recursive_post_grad_passes, fake_tensor_prop, view_to_reshape
from torch._inductor.output_code import OutputCode
from torch._inductor.virtualized import V


class GraphModuleOutput(OutputCode):
    """A post-grad graph run as FX code where Inductor would run generated code."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        # AOTAutograd calls it with one list of inputs, as Inductor's code. An instance attribute:
        # the wrappers around the backward (functools.wraps) copy the instance's __dict__ only.
        self._boxed_call = True

    def __call__(self, inputs: Sequence[Any]) -> Any:
        args = list(inputs)
        if isinstance(inputs, list):
            inputs.clear()  # the boxed calling convention: the callee frees its inputs
        return self.gm(*args)

    @property
    def source_code(self) -> str:
        """What runs in place of generated code (the dump's output_code file)."""
        return "# codegen=False: the post-grad graph, run as FX code\n" + self.gm.code

    def post_compile(self, example_inputs, constants, graph_kwargs) -> None:
        pass

    def prepare_for_serialization(self) -> None:
        raise RuntimeError("a codegen=False graph is not cached (the backend disables caches for it)")

    def set_triton_bundle(self, triton_bundle: Any) -> None:
        pass


def inner_compile_without_codegen(gm: fx.GraphModule, example_inputs, **kwargs) -> OutputCode:
    """What `compile_fx_inner` does to a graph before lowering it (torch 2.11-2.13's
    `fx_codegen_and_compile`), then the graph itself as the compiled code."""
    view_to_reshape(gm)
    with torch.no_grad():
        fake_mode = fake_tensor_prop(gm, example_inputs)
    with V.set_fake_mode(fake_mode):
        _recursive_post_grad_passes(gm, is_inference=kwargs.get("is_inference", False))
    gm.recompile()
    return GraphModuleOutput(gm)
