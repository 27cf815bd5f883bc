"""simple_fsdp in two real gloo processes: a few training steps of llama-tiny, compiled with
`fvcompile.optimize(fullgraph=True, codegen=False)`, give the losses and weights of training in
one process (to fp32 rounding); mixed precision trains; DCP checkpoints reshard (1 -> 2 ranks
when the ranks load their initial weights, 2 -> 1 when the test reads their final ones).
All in one spawn: every spawn imports torch and fvcompile again in each rank."""
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 3
BATCH = 4  # global: each rank trains on BATCH // WORLD_SIZE rows
LR = 0.5
TIMEOUT_S = 240  # a whole spawn; a rank waits at most 60 s for the other


def _optimizer(params):
    # SGD: an update linear in the gradient, so that weights agree to the rounding of the gradients
    # (Adam divides by sqrt(v) and turns rounding noise in near-zero gradients into whole steps).
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _reference(tmp_path):
    """llama-tiny trained in one process: its losses, final weights and its initial checkpoint."""
    from fvcompile.fsdp import save_checkpoint
    from fvcompile.models import get

    spec = get("llama-tiny")
    torch.manual_seed(0)
    model = spec.build()
    save_checkpoint(model, str(tmp_path / "init"))  # no process group: one writer
    batch = spec.train_batch(model, BATCH)
    optimizer = _optimizer(model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = spec.train_step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def _train(model, spec, batch, rank, compile_: bool):
    from fvcompile import optimize

    optimizer = _optimizer(model.parameters())
    step_model = optimize(model, fullgraph=True, codegen=False) if compile_ else model
    local = tuple(t.chunk(WORLD_SIZE)[rank] for t in batch)
    losses = []
    for _ in range(STEPS):
        loss = spec.train_step(step_model, local)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # the global loss: the mean of equal-sized local batches
        losses.append(mean.item() / WORLD_SIZE)
    if compile_:
        report = step_model.fvcompile_report  # every step ran the one compiled graph
        assert (report.graph_calls, report.eager_calls, len(report.graphs)) == (STEPS, 0, 1), report.summary()
    return losses, optimizer


def _worker(rank, tmp, jobs):
    from torch.distributed.device_mesh import init_device_mesh

    from fvcompile.fsdp import MixedPrecisionPolicy, full_state_dict, load_checkpoint, save_checkpoint, simple_fsdp
    from fvcompile.models import get

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", WORLD_SIZE), rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        spec = get("llama-tiny")
        results = {}
        for job in jobs:
            mode, compile_, mp, save = job["mode"], job["compile"], job.get("mp"), job.get("save")
            torch.manual_seed(1000 + rank)  # different on each rank: the weights come from the checkpoint
            model = spec.build()
            batch = spec.train_batch(model, BATCH)
            mesh = init_device_mesh("cpu", (1, WORLD_SIZE) if mode == "hybrid_shard" else (WORLD_SIZE,))
            policy = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32) if mp else None
            simple_fsdp(model, mesh, mode=mode, mp_policy=policy)
            load_checkpoint(model, f"{tmp}/init")  # saved by one process, loaded on two
            losses, optimizer = _train(model, spec, batch, rank, compile_)
            param_dtypes = {p.dtype for p in model.parameters()}
            state = {k: v.detach().clone() for k, v in full_state_dict(model).items()}
            if save:
                save_checkpoint(model, f"{tmp}/{save}")
            if job.get("optimizer_roundtrip"):
                _check_optimizer_roundtrip(model, optimizer, spec, f"{tmp}/with_optimizer")
            results[job["name"]] = {"losses": losses, "state": state, "param_dtypes": param_dtypes}
        if rank == 0:
            torch.save(results, f"{tmp}/results.pt")
    finally:
        dist.destroy_process_group()


def _check_optimizer_roundtrip(model, optimizer, spec, path):
    """Model and optimizer state saved in one mode load into a model wrapped in another (other
    placements: the checkpoint reshards) and a fresh optimizer, by parameter name."""
    from fvcompile.fsdp import full_state_dict, load_checkpoint, save_checkpoint, simple_fsdp

    save_checkpoint(model, path, optimizer)
    momentum = {n: optimizer.state[p]["momentum_buffer"].full_tensor() for n, p in model.named_parameters()}
    other = simple_fsdp(spec.build(), _mesh_1d(), mode="replicate")
    other_optimizer = _optimizer(other.parameters())
    load_checkpoint(other, path, other_optimizer)
    _assert_same_state(full_state_dict(other), full_state_dict(model), atol=0, rtol=0)
    for n, p in other.named_parameters():
        torch.testing.assert_close(other_optimizer.state[p]["momentum_buffer"].full_tensor(), momentum[n], atol=0, rtol=0, msg=n)


def _mesh_1d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD_SIZE,))


def _spawn(tmp_path, jobs):
    """Run `jobs` in WORLD_SIZE gloo processes; a rank that fails or hangs fails the test in
    bounded time."""
    ctx = mp.start_processes(_worker, args=(str(tmp_path), jobs), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD_SIZE} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return torch.load(tmp_path / "results.pt", weights_only=False)


def _assert_same_state(got, want, **tol):
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, **tol)


@pytest.mark.distributed
def test_two_ranks_train_like_one_process_and_checkpoints_reshard(tmp_path):
    from fvcompile.fsdp import load_checkpoint
    from fvcompile.models import get

    want_losses, want_state = _reference(tmp_path)
    results = _spawn(tmp_path, [
        {"name": "fully_shard", "mode": "fully_shard", "compile": True, "save": "fully_shard"},
        {"name": "replicate", "mode": "replicate", "compile": True},
        {"name": "hybrid_shard eager", "mode": "hybrid_shard", "compile": False, "optimizer_roundtrip": True},
        # Eager: test_fsdp_frontend checks the dtypes of the compiled graph's collectives.
        {"name": "bf16 fully_shard eager", "mode": "fully_shard", "compile": False, "mp": torch.bfloat16},
    ])
    fp32 = dict(atol=1e-5, rtol=1e-4)
    for name in ("fully_shard", "replicate", "hybrid_shard eager"):
        torch.testing.assert_close(results[name]["losses"], want_losses, msg=name, **fp32)
        _assert_same_state(results[name]["state"], want_state, **fp32)

    # Mixed precision: bf16 compute, fp32 master weights and reduction; losses near fp32's.
    bf16 = results["bf16 fully_shard eager"]
    assert bf16["param_dtypes"] == {torch.float32}
    torch.testing.assert_close(bf16["losses"], want_losses, atol=5e-2, rtol=1e-2)
    assert bf16["losses"][-1] < bf16["losses"][0]

    # The checkpoint saved by the two ranks loads in this process, into the plain model.
    model = get("llama-tiny").build()
    load_checkpoint(model, str(tmp_path / "fully_shard"))
    _assert_same_state(model.state_dict(), results["fully_shard"]["state"], atol=0, rtol=0)
