"""Checks shared by the tests, the benchmarks and the GPU check script."""
from __future__ import annotations

import contextlib

import torch

import fvcompile
from fvcompile.models import get


def assert_train_step_parity(name: str, device: str = "cpu", atol: float = 1e-5, rtol: float = 1e-4,
                             **optimize_kwargs) -> tuple[float, float]:
    """One training step of registry model `name`, optimized vs eager: the loss and every
    parameter's gradient must agree. Returns (optimized loss, eager loss)."""
    spec = get(name)
    torch.manual_seed(0)
    model = spec.build().to(device)
    batch = spec.train_batch(model, 2)
    loss_optimized = spec.train_step(fvcompile.optimize(model, **optimize_kwargs), batch)
    loss_optimized.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss_eager = spec.train_step(model, batch)
    loss_eager.backward()
    torch.testing.assert_close(loss_optimized, loss_eager, atol=atol, rtol=rtol)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=atol, rtol=rtol * 10, msg=n)
    return loss_optimized.item(), loss_eager.item()


def op_name(op) -> str:
    """The name an op has in the report's op counts: "aten.mm.default" for torch.ops.aten.mm.default."""
    return op if isinstance(op, str) else str(op)


class PassTestBackend:
    """A `torch.compile` backend for testing passes: compiles as fvcompile does (without codegen
    unless asked) and keeps the report, so that a test counts ops before and after each pass
    instead of matching the words of a report (the habit of vLLM's compile tests).

        backend = PassTestBackend(Sparse24())
        torch.compile(model, backend=backend)(x).sum().backward()
        assert backend.op_count(torch.ops.fvcompile.sparse24_relu.default) == 2
        assert backend.op_count(torch.ops.aten.relu.default, before=True, graph_kind="joint") == 2
    """

    def __init__(self, *passes, codegen: bool = False, **options):
        from fvcompile.report import OptimizeReport

        self.passes = list(passes)
        self.codegen = codegen
        self.options = options  # more fvcompile/Inductor options (include=, exclude=, ...)
        self.report = OptimizeReport()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from fvcompile.backend import fvcompile_backend

        return fvcompile_backend(gm, example_inputs, options={
            **self.options, "passes": self.passes, "codegen": self.codegen, "report": self.report,
            "disable_caches": True})

    def runs(self, pass_name: str | None = None, graph_kind: str | None = None):
        """The recorded runs of a pass (every pass: None), on graphs of one kind (every kind: None)."""
        return [r for r in self.report.pass_runs(pass_name) if graph_kind in (None, r.graph_kind)]

    def op_count(self, op, *, before: bool = False, pass_name: str | None = None,
                 graph_kind: str | None = None) -> int:
        """How many calls of `op` the graphs held after (or before) the pass ran, summed over its runs."""
        name = op_name(op)
        return sum((r.ops_before if before else r.ops_after).get(name, 0) for r in self.runs(pass_name, graph_kind))

    def sites(self, pass_name: str | None = None, rewritten: bool = True):
        """Every site the pass rewrote (or skipped), over all its runs."""
        return [s for r in self.runs(pass_name) for s in (r.result.rewritten if rewritten else r.result.skipped)]


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """One process standing for `world_size` ranks: PyTorch's fake process group (collectives
    trace and run, moving no data), with Dynamo's caches cleared before and after."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()
