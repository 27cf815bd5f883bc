"""fsdp_bucketing and fsdp_reordering at graph level: a 2-block llama-tiny wrapped by simple_fsdp,
traced in one process with a fake process group of 4 ranks (its collectives move no data, so
these tests check the graphs and the reports; tests/fsdp checks the numbers in 2 real ranks)."""
import dataclasses
import datetime
import threading

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import fvcompile
from fvcompile.fsdp import MixedPrecisionPolicy, simple_fsdp
from fvcompile.models import get
from fvcompile.models.llama import Llama
from fvcompile.passes.fsdp_bucketing import FSDPBucketing
from fvcompile.passes.fsdp_cost import CostModel
from fvcompile.passes.fsdp_collectives import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER, WAIT
from fvcompile.passes.fsdp_ranks import CollectiveMismatchError, agree
from fvcompile.passes.fsdp_reordering import FSDPReordering
from fvcompile.testing import PassTestBackend, fake_process_group

WORLD_SIZE = 4
PARAMS = 2 * 9 + 3  # per block: 2 norms, 4 attention and 3 FFN weights; embedding, final norm, output
COST = CostModel.preset("cpu_gloo")
BUCKETING, LAST = "fsdp_bucketing", "keep_graphs"  # op counts after the last pass: what Inductor gets


@pytest.fixture(scope="module")
def fake_world():
    with fake_process_group(WORLD_SIZE):
        yield


class KeepGraphs(fvcompile.GraphPass):
    """Changes nothing: keeps a copy of each graph it sees (runs after the passes under test)."""

    name = "keep_graphs"
    hook = "post_grad"

    def __init__(self):
        self.graphs = {}

    def run(self, gm, ctx):
        self.graphs[ctx.graph_kind] = list(gm.graph.nodes)
        return fvcompile.PassResult()


def _traced(*passes, mp_policy=None, mode="fully_shard"):
    """Trace one training step of the wrapped model through `passes`; the backend and the graphs."""
    spec = get("llama-tiny")
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(spec.extra["config"], n_layers=2))
    mesh = init_device_mesh("cpu", (2, WORLD_SIZE // 2) if mode == "hybrid_shard" else (WORLD_SIZE,))
    simple_fsdp(model, mesh, mode=mode, mp_policy=mp_policy)
    keep = KeepGraphs()
    backend = PassTestBackend(*passes, keep)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    spec.train_step(compiled, spec.train_batch(model, 2)).backward()
    return backend, keep.graphs


@pytest.fixture(scope="module")
def auto_trace(fake_world):
    """The passes `passes="auto"` picks for a graph with collectives: cost-model buckets, reordered."""
    from fvcompile.passes import resolve_passes

    passes = resolve_passes("auto", torch.device("cpu"))
    assert [p.name for p in passes] == ["fsdp_bucketing", "fsdp_reordering"]
    return _traced(*passes)


def test_cost_model_buckets_every_collective_once(auto_trace):
    backend, graphs = auto_trace
    before = {k: backend.op_count(ALL_GATHER, before=True, pass_name=BUCKETING, graph_kind=k) for k in ("forward", "backward")}
    # The backward gathers again (reshard after forward), all but the embedding (its gradient needs no weight).
    assert before == {"forward": PARAMS, "backward": PARAMS - 1}
    assert backend.op_count(REDUCE_SCATTER, before=True, pass_name=BUCKETING, graph_kind="backward") == PARAMS
    forward_ag = backend.op_count(ALL_GATHER, pass_name=LAST, graph_kind="forward")
    backward_rs = backend.op_count(REDUCE_SCATTER, pass_name=LAST, graph_kind="backward")
    assert 1 <= forward_ag <= PARAMS // 4 and 1 <= backward_rs < PARAMS
    # Every bucket is one rewritten site; its members add up to every parameter.
    sites = backend.sites("fsdp_bucketing")
    removed = sum(s.ops.get(str(ALL_GATHER), 0) for s in sites if s.kind == "all_gather")
    after = forward_ag + backend.op_count(ALL_GATHER, pass_name=LAST, graph_kind="backward")
    assert removed == after - sum(before.values())
    # A bucket's gather reads one flat buffer: the shards, flattened and concatenated.
    for node in graphs["forward"]:
        if node.target == ALL_GATHER:
            assert node.args[0].target == torch.ops.aten.cat.default or len(node.args[0].meta["val"].shape) == 1
    note = backend.runs("fsdp_bucketing")[0].result.notes[0]
    assert "cost model" in note and "cpu_gloo" in note


def test_plan_by_module_name_with_mixed_precision(fake_world):
    plan = [["tok_embeddings", "layers.0"], ["layers.1", "norm"]]  # "output" is left out
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    backend, graphs = _traced(FSDPBucketing(plan=plan), mp_policy=policy)
    assert backend.op_count(ALL_GATHER, pass_name=LAST, graph_kind="forward") == 3  # two buckets and the output's own
    assert backend.op_count(REDUCE_SCATTER, pass_name=LAST, graph_kind="backward") == 3
    skipped = backend.sites("fsdp_bucketing", rewritten=False)
    assert {s.module for s in skipped} == {"output"} and {s.reason for s in skipped} == {"not_in_plan"}
    # Buckets gather in the compute dtype and reduce in the reduce dtype.
    gathers = [n for n in graphs["forward"] if n.target == ALL_GATHER]
    assert {n.meta["val"].dtype for n in gathers} == {torch.bfloat16}
    reductions = [n for n in graphs["backward"] if n.target == REDUCE_SCATTER]
    assert {n.meta["val"].dtype for n in reductions} == {torch.float32}


def test_plan_errors_name_the_module(fake_world):
    with pytest.raises(ValueError, match="splits the parameters of 'layers.0'"):
        FSDPBucketing(plan=[["layers.0"], ["layers.0.attention"]])
    with pytest.raises(ValueError, match="names module 'norm' twice"):
        FSDPBucketing(plan=[["norm"], ["norm"]])
    with pytest.raises(TypeError, match="list of buckets"):
        FSDPBucketing(plan="layers")
    with pytest.raises(RuntimeError, match="names 'layers.7', which holds no parameter.*layers.0.attention.wq"):
        _traced(FSDPBucketing(plan=[["layers.0"], ["layers.7"]]))


def test_bit_exact_keeps_reductions_and_a_zero_budget_prefetches_nothing(fake_world):
    backend, graphs = _traced(FSDPBucketing(bit_exact=True), FSDPReordering(memory_budget_mb=0))
    assert backend.op_count(REDUCE_SCATTER, pass_name=LAST, graph_kind="backward") == PARAMS
    assert backend.op_count(ALL_GATHER, pass_name=LAST, graph_kind="backward") < PARAMS
    assert {s.reason for s in backend.sites("fsdp_bucketing", rewritten=False)} == {"bit_exact"}
    forward = graphs["forward"]
    assert all(not _between(forward, g) for g in forward if g.target == ALL_GATHER)
    reasons = {s.reason for r in backend.runs("fsdp_reordering", "forward") for s in r.result.skipped}
    assert reasons == {"first", "memory_budget"}


@pytest.mark.parametrize("mode", ["replicate", "hybrid_shard"])
def test_all_reduces_are_bucketed_too(fake_world, mode):
    backend, graphs = _traced(FSDPBucketing(), FSDPReordering(keep_peak=False), mode=mode)
    before = backend.op_count(ALL_REDUCE, before=True, pass_name=BUCKETING, graph_kind="backward")
    after = backend.op_count(ALL_REDUCE, pass_name=LAST, graph_kind="backward")
    assert before == PARAMS and 1 <= after < before
    # Each group's last reduction is exposed (nothing left to compute), every other one overlaps.
    exposed = [s.reason for r in backend.runs("fsdp_reordering", "backward") for s in r.result.skipped]
    assert exposed == ["last"] * (2 if mode == "hybrid_shard" else 1)


def _between(nodes, start):
    """The compute nodes (not views, not collectives) between a collective's start and its wait."""
    wait = next(u for u in start.users if u.target == WAIT)
    i, j = nodes.index(start), nodes.index(wait)
    return [n for n in nodes[i + 1:j] if COST.node_s(n) > 0]


def test_reordering_prefetches_gathers_and_delays_reductions(fake_world):
    backend, graphs = _traced(FSDPBucketing(cost=COST), FSDPReordering(keep_peak=False))  # every move made
    forward = graphs["forward"]
    gathers = [n for n in forward if n.target == ALL_GATHER]
    assert len(gathers) >= 2
    assert not _between(forward, gathers[0])  # the first is needed at once
    assert all(_between(forward, g) for g in gathers[1:])  # the others overlap matmuls
    backward = graphs["backward"]
    reductions = [n for n in backward if n.target == REDUCE_SCATTER]
    assert all(_between(backward, r) for r in reductions[:-1])
    # The report: one site per collective, overlapped (rewritten) or exposed (skipped, with why).
    sites = {s.node: s for run in backend.runs("fsdp_reordering", "forward")
             for s in run.result.rewritten + run.result.skipped}
    assert set(sites) == {g.name for g in gathers}
    first = sites[gathers[0].name]
    assert first.reason == "first" and "exposed" in first.detail and "all_gather bucket 1" in first.detail
    assert "overlaps" in sites[gathers[1].name].detail
    last = [s for r in backend.runs("fsdp_reordering", "backward") for s in r.result.skipped
            if s.node == reductions[-1].name]
    assert last and last[0].reason == "last"


def test_auto_reordering_keeps_the_peak(auto_trace):
    # Under auto, a move that would raise the graph's peak memory is undone and reported as such;
    # the others overlap.
    backend, graphs = auto_trace
    sites = [s for r in backend.runs("fsdp_reordering") for s in r.result.rewritten + r.result.skipped]
    assert any("overlaps" in s.detail for s in sites)
    assert {s.reason for s in sites} <= {"", "first", "last", "peak_memory", "partly_exposed"}
    for s in sites:
        if s.reason == "peak_memory":
            assert "raise the graph's peak memory" in s.detail and "MiB" in s.detail


def test_peak_guard_undoes_only_the_moves_that_raise_the_peak():
    from types import SimpleNamespace

    from fvcompile.passes.fsdp_reordering import PeakGuard

    graph = torch.fx.Graph()
    x = graph.placeholder("primals_1")
    x.meta["val"] = torch.empty(4)

    def op(*args, numel):
        node = graph.call_function(torch.ops.aten.add.Tensor, args)
        node.meta["val"] = torch.empty(numel)
        return node
    big1 = op(x, x, numel=1000)
    small1 = op(big1, big1, numel=4)  # big1 dies here
    big2 = op(x, x, numel=1000)
    small2 = op(big2, big2, numel=4)
    empty = op(x, x, numel=0)
    graph.output((small1, small2, empty))
    guard = PeakGuard(graph, "forward")
    assert not guard.move(SimpleNamespace(start=big2), lambda: big1.append(big2))  # both big ones alive: undone
    assert list(graph.nodes)[1:5] == [big1, small1, big2, small2]
    assert "from 0.003845 to 0.007645 MiB" in guard.refused[big2]
    assert guard.move(SimpleNamespace(start=empty), lambda: x.append(empty))  # nothing rises: kept
    assert list(graph.nodes)[1:3] == [empty, big1] and empty not in guard.refused


def test_auto_passes_skip_graphs_without_collectives(fake_world):
    # Not installed at all (no config patch, no cache key): the graph takes no distributed tensor.
    plain = fvcompile.optimize(torch.nn.Linear(4, 4), codegen=False)
    plain(torch.randn(2, 4))
    assert plain.fvcompile_report.passes == [] and not plain.fvcompile_report.pass_runs()


def test_ranks_that_disagree_fail_on_every_rank_with_the_difference():
    store = dist.HashStore()
    errors = {}

    def rank(r, seq):
        try:
            agree(seq, store, r, 2, "forward graph #0", timeout=datetime.timedelta(seconds=10))
        except CollectiveMismatchError as e:
            errors[r] = str(e)

    same = ["all_gather_into_tensor((64,) torch.float32, 2, 0)"]
    threads = [threading.Thread(target=rank, args=(r, same + [f"reduce_scatter_tensor(({8 * (r + 1)},) ...)"]))
               for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert set(errors) == {0, 1}
    assert "collective #1" in errors[0] and "(8,)" in errors[0] and "(16,)" in errors[0]
    # A rank that never arrives is named after the timeout.
    with pytest.raises(CollectiveMismatchError, match=r"rank\(s\) \[1\] did not reach"):
        agree(same, dist.HashStore(), 0, 2, "backward graph #0", timeout=datetime.timedelta(seconds=1))
