"""simple_fsdp's front end in one process: a fake process group stands for the ranks (its
collectives move no data), so these tests check structure, not numbers: placements per mode,
the model's own names and state_dict keys, and the collectives in the graphs that
`fvcompile.optimize(fullgraph=True)` traces (counted, forward and backward)."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import fvcompile
from fvcompile.fsdp import MixedPrecisionPolicy, simple_fsdp
from fvcompile.models import get
from fvcompile.models.llama import Llama
from fvcompile.testing import fake_process_group

WORLD_SIZE = 4
ALL_GATHER = "_c10d_functional.all_gather_into_tensor.default"
REDUCE_SCATTER = "_c10d_functional.reduce_scatter_tensor.default"
ALL_REDUCE = "_c10d_functional.all_reduce.default"


@pytest.fixture
def fake_world():
    with fake_process_group(WORLD_SIZE):
        yield


class RecordCollectives(fvcompile.GraphPass):
    """Changes nothing: records the dtype of every collective's input, per graph."""

    name = "record_collectives"
    hook = "post_grad"

    def __init__(self):
        self.dtypes = {}  # graph kind -> [(op name, dtype)]

    def run(self, gm, ctx):
        self.dtypes[ctx.graph_kind] = [
            (str(n.target), n.args[0].meta["val"].dtype) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("_c10d_functional.")
            and "wait_tensor" not in str(n.target)]
        return fvcompile.PassResult()


def _traced_collectives(model, spec, *, dtypes: bool = False) -> dict[str, dict]:
    """{graph kind: {op: count}} (or {graph kind: {(op, dtype): count}}) of the collectives in the
    training graphs `optimize(fullgraph=True, codegen=False)` traces."""
    record = RecordCollectives()
    optimized = fvcompile.optimize(model, passes=[record], fullgraph=True, codegen=False)
    spec.train_step(optimized, spec.train_batch(model, 2)).backward()
    assert list(record.dtypes) == ["forward", "backward"]  # one graph: no break
    counts = {}
    for kind, found in record.dtypes.items():
        keys = found if dtypes else [op for op, _ in found]
        counts[kind] = {key: keys.count(key) for key in keys}
    return counts


def _wrapped_llama(mode, mesh_shape, **kwargs):
    # llama-tiny with one block: the structure of two, at half the trace time.
    spec = get("llama-tiny")
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(spec.extra["config"], n_layers=1))
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    wrapped = simple_fsdp(model, init_device_mesh("cpu", mesh_shape), mode=mode, **kwargs)
    assert wrapped is model
    # Names, keys and global shapes are the model's own; the values are DTensors.
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert all(isinstance(p, DTensor) and p.shape == shapes[n] for n, p in model.named_parameters())
    assert all(isinstance(v, DTensor) for k, v in model.state_dict().items() if k in shapes)
    return spec, model, len(names)


def test_fully_shard(fake_world):
    spec, model, n = _wrapped_llama("fully_shard", (WORLD_SIZE,))
    for name, p in model.named_parameters():
        assert p.placements == (Shard(0),), name
        assert p.to_local().shape[0] == p.shape[0] // WORLD_SIZE, name
    # A module reads its parameter gathered, as a plain tensor of the full shape.
    weight = model.layers[0].attention.wq.weight
    assert type(weight) is torch.Tensor and weight.shape == model.layers[0].attention.wq._parameters["weight"].shape
    ops = _traced_collectives(model, spec)
    # One all-gather per parameter in the forward; in the backward every parameter's gradient is
    # reduce-scattered and the gathers are recomputed (reshard after forward), except the
    # embedding's: its backward needs the token ids, not the weight.
    assert ops["forward"] == {ALL_GATHER: n}
    assert ops["backward"][REDUCE_SCATTER] == n
    assert ops["backward"][ALL_GATHER] == n - 1
    assert ALL_REDUCE not in ops["backward"]


def test_fully_shard_without_reshard_keeps_gathered_parameters(fake_world):
    spec, model, n = _wrapped_llama("fully_shard", (WORLD_SIZE,), reshard_after_forward=False)
    ops = _traced_collectives(model, spec)
    assert ops["forward"][ALL_GATHER] == n
    assert ops["backward"][REDUCE_SCATTER] == n
    assert ALL_GATHER not in ops["backward"]


def test_replicate(fake_world):
    spec, model, n = _wrapped_llama("replicate", (WORLD_SIZE,))
    assert all(p.placements == (Replicate(),) and p.to_local().shape == p.shape for p in model.parameters())
    ops = _traced_collectives(model, spec)
    assert ops["forward"] == {}  # nothing to gather
    assert ops["backward"] == {ALL_REDUCE: n}


def test_hybrid_shard(fake_world):
    spec, model, n = _wrapped_llama("hybrid_shard", (2, WORLD_SIZE // 2))
    for name, p in model.named_parameters():
        assert p.placements == (Replicate(), Shard(0)), name
        assert p.to_local().shape[0] == p.shape[0] // (WORLD_SIZE // 2), name
    ops = _traced_collectives(model, spec)
    assert ops["forward"][ALL_GATHER] == n  # over the shard dimension only
    # Gradients: reduce-scattered over the shard dimension, all-reduced over the replicas.
    assert ops["backward"][REDUCE_SCATTER] == n
    assert ops["backward"][ALL_REDUCE] == n
    assert ops["backward"][ALL_GATHER] == n - 1


def test_mixed_precision_gathers_in_param_dtype_and_reduces_in_reduce_dtype(fake_world):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    spec, model, n = _wrapped_llama("fully_shard", (WORLD_SIZE,), mp_policy=policy)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert model.output.weight.dtype == torch.bfloat16  # what the forward computes with
    spec.train_step(model, spec.train_batch(model, 2)).backward()  # eager
    assert all(p.grad.dtype == torch.float32 and p.grad.placements == (Shard(0),) for p in model.parameters())
    model.zero_grad()
    ops = _traced_collectives(model, spec, dtypes=True)
    assert ops["forward"] == {(ALL_GATHER, torch.bfloat16): n}
    assert ops["backward"] == {(ALL_GATHER, torch.bfloat16): n - 1, (REDUCE_SCATTER, torch.float32): n}


def test_third_party_module_written_the_usual_way(fake_world):
    """torch's own TransformerEncoderLayer: parameters read as attributes deep inside
    MultiheadAttention (in_proj_weight, out_proj.weight) are gathered like any other."""
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    keys = list(model.state_dict())
    simple_fsdp(model, init_device_mesh("cpu", (WORLD_SIZE,)))
    assert list(model.state_dict()) == keys
    n = len(list(model.parameters()))
    record = RecordCollectives()
    optimized = fvcompile.optimize(model, passes=[record], fullgraph=True, codegen=False)
    optimized(torch.randn(2, 5, 16)).sum().backward()
    assert [op for op, _ in record.dtypes["forward"]] == [ALL_GATHER] * n
    assert [op for op, _ in record.dtypes["backward"]].count(REDUCE_SCATTER) == n
    assert all(p.grad is not None and p.grad.placements == (Shard(0),) for p in model.parameters())


def test_fsdp2_mixed_precision_policy_is_accepted():
    from torch.distributed.fsdp import MixedPrecisionPolicy as FSDP2Policy

    ours = MixedPrecisionPolicy.from_any(FSDP2Policy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    assert ours == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with pytest.raises(ValueError, match="output_dtype"):
        MixedPrecisionPolicy.from_any(FSDP2Policy(output_dtype=torch.float32))


def test_tied_weights_stay_shared(fake_world):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.head = nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

    model = simple_fsdp(Tied(), init_device_mesh("cpu", (WORLD_SIZE,)))
    assert model.head._parameters["weight"] is model.emb._parameters["weight"]
    assert len(list(model.parameters())) == 1


def test_bad_arguments_are_clear_errors(fake_world):
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    with pytest.raises(ValueError, match="unknown mode 'zero3'.*fully_shard, replicate, hybrid_shard"):
        simple_fsdp(nn.Linear(4, 4), mesh, mode="zero3")
    with pytest.raises(ValueError, match="hybrid_shard' needs a 2-D mesh"):
        simple_fsdp(nn.Linear(4, 4), mesh, mode="hybrid_shard")
    with pytest.raises(ValueError, match="fully_shard' shards over a 1-D mesh"):
        simple_fsdp(nn.Linear(4, 4), init_device_mesh("cpu", (2, 2)))
    with pytest.raises(TypeError, match="param_dtype takes a floating-point torch.dtype"):
        MixedPrecisionPolicy(param_dtype="bf16")
    model = simple_fsdp(nn.Linear(4, 4), mesh)
    with pytest.raises(ValueError, match="DTensors already"):
        simple_fsdp(model, mesh)


def test_meta_device_model_wraps_with_no_memory():
    """What the cluster simulation needs: Llama-3 8B built on the meta device wraps on a 64-rank
    hybrid mesh (8 x 8) of a fake process group, each rank holding 1/8 of every weight."""
    with fake_process_group(64):
        with torch.device("meta"):
            model = get("llama3-8b").build()
        simple_fsdp(model, init_device_mesh("cpu", (8, 8)), mode="hybrid_shard")
        shard = model.layers[0].attention.wq._parameters["weight"]
        assert shard.placements == (Replicate(), Shard(0)) and shard.device.type == "meta"
        assert shard.to_local().shape == (4096 // 8, 4096)
