"""The platform's extension points: every hook by name, passes' config needs, what a pass
knows (PassContext), codegen=False's graphs, and the op-counting test backend."""
from __future__ import annotations

import pytest
import torch
from torch._inductor import config as inductor_config
from toy_passes import Mlp, RecordingPass, ReluToClampPass

import fvcompile
from fvcompile.hooks import HOOKS
from fvcompile.passes.base import GraphPass, PassContext, PassResult
from fvcompile.testing import PassTestBackend

aten = torch.ops.aten


class NeedsConfig(GraphPass):
    name = "needs_config"

    def __init__(self, value: bool, name: str = "needs_config"):
        self.value = value
        self.name = name
        self.seen: list[bool] = []

    def config_patches(self):
        return {"epilogue_fusion": self.value}

    def run(self, gm, ctx):
        self.seen.append(inductor_config.epilogue_fusion)
        return PassResult()


@pytest.mark.parametrize("hook", [h for h, spec in HOOKS.items() if spec.stage != "scheduler"])
def test_a_pass_runs_at_every_fx_hook_by_name(hook):
    recorder = RecordingPass(hook)
    model = Mlp()
    torch.compile(model, backend=PassTestBackend(recorder))(torch.randn(2, 16, requires_grad=True)).sum().backward()
    kinds = [c.graph_kind for c in recorder.contexts]
    assert kinds == (["joint"] if HOOKS[hook].stage == "joint" else ["forward", "backward"])
    assert all(c.hook == hook for c in recorder.contexts)


def test_post_grad_pass_is_told_inference_by_inductor():
    recorder = RecordingPass("post_grad_pre")
    with torch.no_grad():
        torch.compile(Mlp(), backend=PassTestBackend(recorder))(torch.randn(2, 16))
    assert [c.graph_kind for c in recorder.contexts] == ["inference"] and recorder.contexts[0].is_inference


def test_forward_and_backward_share_one_store_per_compile():
    class Remember(GraphPass):
        name = "remember"

        def run(self, gm, ctx):
            ctx.store.setdefault(self.name, []).append(ctx.graph_kind)
            self.store = ctx.store
            return PassResult()

    first, second = Remember(), Remember()
    x = torch.randn(2, 16, requires_grad=True)
    torch.compile(Mlp(), backend=PassTestBackend(first))(x).sum().backward()
    torch._dynamo.reset()
    torch.compile(Mlp(), backend=PassTestBackend(second))(x).sum().backward()
    assert first.store == {"remember": ["forward", "backward"]}
    assert second.store is not first.store  # a new compile, a new store


def test_a_single_process_context_has_no_collectives():
    recorder = RecordingPass("post_grad")
    torch.compile(Mlp(), backend=PassTestBackend(recorder))(torch.randn(2, 16))
    ctx = recorder.contexts[0]
    assert (ctx.rank, ctx.world_size, ctx.process_groups) == (0, 1, ())


def test_config_patches_reach_the_compile_and_nothing_global():
    before = inductor_config.epilogue_fusion
    needs = NeedsConfig(not before)
    torch.compile(Mlp(), backend=PassTestBackend(needs))(torch.randn(2, 16))
    assert needs.seen == [not before] and inductor_config.epilogue_fusion == before


def test_passes_needing_one_key_differently_are_an_error_naming_both():
    with pytest.raises(ValueError, match="'first' and 'second' need Inductor config epilogue_fusion"):
        fvcompile.optimize(Mlp(), passes=[NeedsConfig(True, "first"), NeedsConfig(False, "second")],
                           codegen=False)(torch.randn(2, 16))
    with pytest.raises(ValueError, match="options= sets epilogue_fusion=False"):
        fvcompile.optimize(Mlp(), passes=[NeedsConfig(True)], codegen=False,
                           options={"epilogue_fusion": False})(torch.randn(2, 16))


def test_op_counts_before_and_after_each_pass():
    backend = PassTestBackend(ReluToClampPass())
    torch.compile(Mlp(), backend=backend)(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert backend.op_count(aten.relu.default, before=True, graph_kind="joint") == 1
    assert backend.op_count(aten.relu.default) == 0
    assert backend.op_count(aten.clamp_min.default) == 1
    assert backend.runs("relu_to_clamp")[0].op_delta() == {"aten.clamp_min.default": 1, "aten.relu.default": -1}


def test_every_hook_is_dumped(tmp_path):
    model = fvcompile.optimize(Mlp(), codegen=False, dump_dir=tmp_path)
    model(torch.randn(2, 16, requires_grad=True)).sum().backward()
    names = [p.name for p in (tmp_path / "graph_0_0").iterdir()]
    for hook in ("joint", "joint_post"):
        assert any(n.endswith(f"joint_at_{hook}_hook.py") for n in names), (hook, names)
    for hook in ("post_grad_pre", "post_grad"):
        for kind in ("forward", "backward"):
            assert any(n.endswith(f"{kind}_at_{hook}_hook.py") for n in names), (hook, kind, names)
    report = model.fvcompile_report
    assert {(h.hook, h.graph_kind) for h in report.graphs[0].hooks} == {
        ("joint", "joint"), ("joint_post", "joint"), ("post_grad_pre", "forward"), ("post_grad", "forward"),
        ("post_grad_pre", "backward"), ("post_grad", "backward")}


@pytest.mark.inductor
def test_codegen_false_gives_post_grad_passes_inductors_inference_graph():
    """The post-grad graph a pass receives without codegen is the one real codegen gives it,
    Inductor's own post-grad passes included (training: test_inductor.py's llama parity test);
    the scheduler hooks run under real codegen only."""
    from fvcompile.models import get

    spec = get("llama-tiny")

    def record(codegen: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = spec.build()
        recorder = RecordingPass("post_grad", name="record_post_grad")
        scheduler = RecordingPass("pre_fusion", name="record_pre_fusion")
        with torch.no_grad():
            spec.train_step(torch.compile(model, backend=PassTestBackend(recorder, scheduler, codegen=codegen)),
                            spec.train_batch(model, 2))
        return recorder, scheduler

    without, scheduler_without = record(codegen=False)
    with_codegen, scheduler_with = record(codegen=True)
    assert [c.graph_kind for c in without.contexts] == ["inference"] == [c.graph_kind for c in with_codegen.contexts]
    assert without.graphs == with_codegen.graphs
    assert not scheduler_without.contexts  # no scheduler without lowering
    assert [c.graph_kind for c in scheduler_with.contexts] == ["inference"] and all(scheduler_with.graphs)
