"""passes/fsdp_timeline: the two-stream simulation and the liveness walk on small hand-built FX
graphs, with a cost model whose numbers are round: a 64x64 matmul takes 1 s, an all-gather of
the test's buffer over 2 ranks 2.5 s."""
import pytest
import torch
from torch import fx

from fvcompile.passes.fsdp_collectives import ALL_GATHER, WAIT
from fvcompile.passes.fsdp_cost import CostModel
from fvcompile.passes.fsdp_timeline import memory_walk, simulate

aten = torch.ops.aten
GATHERED = 1000  # float32 elements of a gathered buffer: 4000 bytes, 2000 of them cross the link
COST = CostModel(flops_per_s=2 * 64**3, bytes_per_s=1e30, op_overhead_s=0.0, latency_s=0.0, bandwidth=800.0)


class Builder:
    """A graph with a matrix input `a` (64x64) and a shard input `shard`, built node by node."""

    def __init__(self):
        self.graph = fx.Graph()
        self.a = self._input("a", torch.empty(64, 64))
        self.shard = self._input("shard", torch.empty(GATHERED // 2))
        self.last = self.a

    def _input(self, name, val):
        node = self.graph.placeholder(name)
        node.meta["val"] = val
        return node

    def op(self, target, args, val):
        node = self.graph.call_function(target, args)
        node.meta["val"] = val
        return node

    def mm(self):
        self.last = self.op(aten.mm.default, (self.last, self.a), torch.empty(64, 64))
        return self.last

    def gather(self):
        return self.op(ALL_GATHER, (self.shard, 2, "0"), torch.empty(GATHERED))

    def wait(self, start):
        return self.op(WAIT, (start,), start.meta["val"])

    def done(self, *outputs):
        self.graph.output(tuple(outputs))
        return self.graph


def test_a_collective_with_enough_compute_before_its_wait_is_hidden():
    b = Builder()
    start = b.gather()
    for _ in range(3):
        b.mm()
    t = simulate(b.done(b.wait(start), b.last), COST)
    assert t.comm_s == pytest.approx(2.5) and t.compute_s == pytest.approx(3.0)
    assert t.exposed_comm_s == 0.0 and t.step_s == pytest.approx(3.0)
    assert t.collectives[0].start_s == 0.0 and t.collectives[0].end_s == pytest.approx(2.5)


def test_a_collective_waited_at_once_is_exposed_fully():
    b = Builder()
    wait = b.wait(b.gather())
    for _ in range(3):
        b.mm()
    t = simulate(b.done(wait, b.last), COST)
    assert t.exposed_comm_s == pytest.approx(2.5) and t.collectives[0].exposed_s == pytest.approx(2.5)
    assert t.step_s == pytest.approx(5.5)


def test_two_collectives_queue_on_the_communication_stream():
    b = Builder()
    first, second = b.gather(), b.gather()
    for _ in range(3):
        b.mm()
    t = simulate(b.done(b.wait(first), b.wait(second), b.last), COST)
    spans = t.collectives
    assert spans[1].issued_s == 0.0 and spans[1].start_s == pytest.approx(2.5)  # queued behind the first
    assert spans[1].end_s == pytest.approx(5.0)
    # Compute ends at 3 s: the first was done by then, the second holds the compute stream 2 s more.
    assert spans[0].exposed_s == 0.0 and spans[1].exposed_s == pytest.approx(2.0)
    assert t.exposed_comm_s == pytest.approx(2.0) and t.step_s == pytest.approx(5.0)


def test_memory_walk_counts_views_once_and_frees_after_the_last_use():
    b = Builder()
    x = b.mm()  # 16 KiB
    view = b.op(aten.view.default, (x, [-1]), torch.empty(64 * 64))  # x's memory, not new
    y = b.mm()  # 16 KiB: x (read through `view` at the end) is still alive
    total = b.op(aten.sum.default, (view,), torch.empty(()))  # x's last use
    z = b.op(aten.mm.default, (y, b.a), torch.empty(64, 64))
    walk = memory_walk(b.done(total, z), count_outputs=True)
    mat = 64 * 64 * 4
    assert walk.peak_bytes == 2 * mat + 4  # x, y and the sum's scalar
    assert walk.end_bytes == mat + 4  # the returned values: z and the scalar (x and y freed)
    # A backward-style walk: inputs counted until their last use, returned values left out.
    b2 = Builder()
    out = b2.mm()
    walk2 = memory_walk(b2.done(out), counted_inputs=[b2.a], count_outputs=False)
    assert walk2.start_bytes == mat and walk2.peak_bytes == mat and walk2.end_bytes == 0


def test_memory_walk_keeps_a_collectives_input_until_its_wait():
    b = Builder()
    shard = b.op(aten.clone.default, (b.shard,), torch.empty(GATHERED // 2))  # 2000 bytes, read by the gather
    start = b.op(ALL_GATHER, (shard, 2, "0"), torch.empty(GATHERED))  # 4000 bytes
    b.mm()  # 16 KiB, while the gather runs: its input is still being sent
    walk = memory_walk(b.done(b.wait(start), b.last), count_outputs=True)
    assert walk.peak_bytes == 2000 + 4000 + 64 * 64 * 4
