"""`codegen=False`: the same passes on the same graphs, without Inductor's code generation.

AOTAutograd with Inductor's decompositions and the min-cut partitioner produces the graphs
Inductor would see; the joint hook runs on the joint (or inference) graph before
partitioning, the post-grad hook on the forward and backward graphs. The graphs then run
as plain FX code. Seconds instead of tens of seconds: for looking at rewrites and for tests.
"""
from __future__ import annotations

from typing import Callable

from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

from fvcompile.pass_manager import run_installed_passes


def _run(installed: Callable | list | None, gm: fx.GraphModule, hook: str, kind: str) -> None:
    # `installed` is a HookPass, or the user's own pass(es) at a hook where fvcompile has none.
    if installed is not None:
        run_installed_passes(installed, gm.graph, hook, kind)
        gm.recompile()


def compile_without_codegen(gm: fx.GraphModule, example_inputs, joint_hook=None, post_grad_hook=None):
    def partition(joint: fx.GraphModule, joint_inputs, **kwargs):
        _run(joint_hook, joint, "joint", "joint")
        return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)

    def train_compiler(graph: fx.GraphModule, _inputs):
        _run(post_grad_hook, graph, "post_grad", "training")
        return make_boxed_func(graph.forward)

    def inference_compiler(graph: fx.GraphModule, _inputs):
        _run(joint_hook, graph, "joint", "inference")
        _run(post_grad_hook, graph, "post_grad", "inference")
        return make_boxed_func(graph.forward)

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=train_compiler,
        bw_compiler=train_compiler,
        inference_compiler=inference_compiler,
        partition_fn=partition,
        decompositions=select_decomp_table(),
        keep_inference_input_mutations=True,
    )
