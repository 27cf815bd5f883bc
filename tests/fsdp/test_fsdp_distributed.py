"""simple_fsdp in two real gloo processes: a few training steps of llama-tiny, compiled with
`fvcompile.optimize(fullgraph=True, codegen=False)` or eager, give the losses and weights of
training in one process (to fp32 rounding), as PyTorch's FSDP2 `fully_shard` does; mixed
precision trains; DCP checkpoints reshard (1 -> 2 ranks when the ranks load their initial
weights, 2 -> 1 when the test reads their final ones); a run saved at step RESUME_AT (model and
optimizer) and resumed on 1 -> 2, 2 -> 2 and 2 -> 1 ranks continues with the losses of the
uninterrupted run; our FSDP passes keep the losses (bit for bit with `bit_exact=True`); ranks
whose graphs would issue different collectives fail at compile time, on both ranks; the cost
model measures the group; and when a rank dies, the other's `RankWatch` raises an error naming it.
All in one spawn: every spawn imports torch and fvcompile again in each rank."""
import datetime
import os
import time
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 4
RESUME_AT = 2  # checkpoints of model and optimizer after this many steps
BATCH = 4  # global: each rank trains on BATCH // WORLD_SIZE rows
LR = 0.5
TIMEOUT_S = 240  # a whole spawn; a rank waits at most 60 s for the other
WATCH = dict(timeout_s=30.0, heartbeat_s=0.2)  # the dead-rank job: named within 3 heartbeats


def _optimizer(params):
    # SGD: an update linear in the gradient, so that weights agree to the rounding of the gradients
    # (Adam divides by sqrt(v) and turns rounding noise in near-zero gradients into whole steps).
    # Momentum: optimizer state that a resumed run must load to continue the same way.
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _batch(spec, model, step: int, rank: int | None = None) -> tuple:
    """The global batch of `step` (rank's part of it when given): a function of the step only,
    so that a resumed run trains on the data the uninterrupted run saw at that step."""
    pool = spec.train_batch(model, BATCH * STEPS)  # llama-tiny's batches are seeded
    batch = tuple(t[step * BATCH:(step + 1) * BATCH] for t in pool)
    return batch if rank is None else tuple(t.chunk(WORLD_SIZE)[rank] for t in batch)


def _train_one_process(model, optimizer, spec, steps, save_at=None) -> list[float]:
    """Train `model` on the global batches of `steps`; save model and optimizer into `save_at`
    after RESUME_AT steps."""
    from fvcompile.fsdp import save_checkpoint

    losses = []
    for step in steps:
        if step == RESUME_AT and save_at:
            save_checkpoint(model, save_at, optimizer)  # no process group: one writer
        loss = spec.train_step(model, _batch(spec, model, step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _reference(tmp_path):
    """llama-tiny trained in one process: its losses, final weights, its initial checkpoint and
    its checkpoint at step RESUME_AT."""
    from fvcompile.fsdp import save_checkpoint
    from fvcompile.models import get

    spec = get("llama-tiny")
    torch.manual_seed(0)
    model = spec.build()
    save_checkpoint(model, str(tmp_path / "init"))
    losses = _train_one_process(model, _optimizer(model.parameters()), spec, range(STEPS),
                                save_at=str(tmp_path / "reference_at_k"))
    return losses, model.state_dict()


def _resume_one_process(checkpoint_id):
    """Losses of steps RESUME_AT.. of the plain model resumed from `checkpoint_id`."""
    from fvcompile.fsdp import load_checkpoint
    from fvcompile.models import get

    spec = get("llama-tiny")
    model = spec.build()
    optimizer = _optimizer(model.parameters())
    load_checkpoint(model, checkpoint_id, optimizer)
    return _train_one_process(model, optimizer, spec, range(RESUME_AT, STEPS))


# -- in each rank -----------------------------------------------------------------------------


def _wrap(model, job, rank):
    """The job's parallelism: simple_fsdp in its mode, or FSDP2 (each block, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fvcompile.fsdp import MixedPrecisionPolicy, simple_fsdp

    mode = job.get("mode", "fully_shard")
    mesh = init_device_mesh("cpu", (1, WORLD_SIZE) if mode == "hybrid_shard" else (WORLD_SIZE,))
    if job.get("impl") == "fsdp2":
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    policy = MixedPrecisionPolicy(param_dtype=job["mp"], reduce_dtype=torch.float32) if job.get("mp") else None
    return simple_fsdp(model, mesh, mode=mode, mp_policy=policy)


def _train(model, optimizer, spec, job, rank, tmp, watch=None) -> list[float]:
    """The job's steps on this rank's part of each batch; returns the global losses."""
    from fvcompile import optimize
    from fvcompile.fsdp import save_checkpoint

    step_model = model
    if job.get("compile"):
        passes = job["passes_by_rank"][rank] if "passes_by_rank" in job else job.get("passes", "auto")
        step_model = optimize(model, fullgraph=True, codegen=False, passes=passes)
    steps = range(RESUME_AT if job.get("resume") else 0, STEPS)
    losses = []
    for step in steps:
        if step == RESUME_AT and job.get("save_at_k"):
            save_checkpoint(model, f"{tmp}/{job['save_at_k']}", optimizer)
        if step == job.get("rank_1_dies_at") and rank == 1:
            os._exit(0)  # status 0: mp.spawn waits for rank 0 instead of killing it
        with watch.step(step) if watch else nullcontext():
            loss = spec.train_step(step_model, _batch(spec, model, step, rank))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)  # the global loss: the mean of equal-sized local batches
        losses.append(mean.item() / WORLD_SIZE)
    if job.get("compile"):
        report = step_model.fvcompile_report  # every step ran the one compiled graph
        assert (report.graph_calls, report.eager_calls, len(report.graphs)) == (len(steps), 0, 1), report.summary()
    return losses


def _run_job(job, spec, rank, tmp) -> dict:
    from fvcompile.fsdp import RankFailure, RankWatch, full_state_dict, load_checkpoint, save_checkpoint

    torch.manual_seed(1000 + rank)  # different on each rank: the weights come from the checkpoint
    model = _wrap(spec.build(), job, rank)
    optimizer = _optimizer(model.parameters())
    if job.get("resume"):  # model and optimizer at step RESUME_AT
        load_checkpoint(model, f"{tmp}/{job['resume']}", optimizer)
    else:
        load_checkpoint(model, f"{tmp}/init")  # saved by one process, loaded on two
    if "passes_by_rank" in job:  # ranks that would issue different collectives fail at compile time
        try:
            _train(model, optimizer, spec, job, rank, tmp)
        except Exception as e:
            return {"error": str(e)}
        return {"error": None}
    if job.get("measure"):  # the cost model's constants, measured on the two ranks
        from fvcompile.passes.fsdp_cost import CostModel

        return {"cost": CostModel.measure()}
    if "rank_1_dies_at" in job:
        started = time.monotonic()
        try:
            with RankWatch(**WATCH) as watch:
                _train(model, optimizer, spec, job, rank, tmp, watch)
        except RankFailure as failure:
            return {"error": str(failure), "ranks": failure.ranks, "seconds": time.monotonic() - started}
        return {"error": None}
    losses = _train(model, optimizer, spec, job, rank, tmp)
    param_dtypes = {p.dtype for p in model.parameters()}
    state = {k: v.detach().clone() for k, v in full_state_dict(model).items()}
    if job.get("save"):
        save_checkpoint(model, f"{tmp}/{job['save']}")
    if job.get("optimizer_roundtrip"):
        _check_optimizer_roundtrip(model, optimizer, spec, f"{tmp}/with_optimizer")
    return {"losses": losses, "state": state, "param_dtypes": param_dtypes}


def _worker(rank, tmp, jobs):
    from fvcompile.models import get

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", WORLD_SIZE), rank=rank,
                            world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        spec = get("llama-tiny")
        results = {job["name"]: _run_job(job, spec, rank, tmp) for job in jobs}
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


# -- in the test process ----------------------------------------------------------------------


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
def test_two_ranks_train_like_one_process_resume_and_name_a_dead_rank(tmp_path):
    from fvcompile.fsdp import load_checkpoint
    from fvcompile.models import get
    from fvcompile.passes.fsdp_bucketing import FSDPBucketing
    from fvcompile.passes.fsdp_reordering import FSDPReordering

    want_losses, want_state = _reference(tmp_path)
    results = _spawn(tmp_path, [
        {"name": "fully_shard", "mode": "fully_shard", "compile": True, "save": "fully_shard"},
        {"name": "replicate", "mode": "replicate", "compile": True},
        {"name": "hybrid_shard eager", "mode": "hybrid_shard", "optimizer_roundtrip": True,
         "save_at_k": "two_ranks_at_k"},
        # Eager: test_fsdp_frontend checks the dtypes of the compiled graph's collectives.
        {"name": "bf16 fully_shard eager", "mode": "fully_shard", "mp": torch.bfloat16},
        {"name": "FSDP2 eager", "impl": "fsdp2"},
        {"name": "resume 1 -> 2", "mode": "fully_shard", "resume": "reference_at_k"},
        {"name": "resume 2 -> 2", "mode": "fully_shard", "resume": "two_ranks_at_k"},
        # Our FSDP passes: "fully_shard" above runs passes="auto" (buckets from the cost model, reordered).
        {"name": "unbucketed", "mode": "fully_shard", "compile": True, "passes": []},
        {"name": "bit_exact", "mode": "fully_shard", "compile": True,
         "passes": [FSDPBucketing(bit_exact=True), FSDPReordering()]},
        {"name": "ranks disagree", "mode": "fully_shard", "compile": True,
         "passes_by_rank": [[FSDPBucketing(plan=["layers.0"])], [FSDPBucketing(plan=["layers.1"])]]},
        {"name": "measure", "measure": True},
        {"name": "dead rank", "mode": "fully_shard", "rank_1_dies_at": 2},  # last: rank 1 is gone after it
    ])
    fp32 = dict(atol=1e-5, rtol=1e-4)
    for name in ("fully_shard", "replicate", "hybrid_shard eager", "FSDP2 eager"):
        torch.testing.assert_close(results[name]["losses"], want_losses, msg=name, **fp32)
        _assert_same_state(results[name]["state"], want_state, **fp32)

    # The FSDP passes: bit_exact (gathers bucketed, reductions per parameter) gives the unbucketed
    # run's losses and weights bit for bit; the default buckets reductions too: fp32 rounding at
    # most (with 2 ranks a sum of two numbers is the same in any order, so it is exact here too).
    torch.testing.assert_close(results["unbucketed"]["losses"], want_losses, **fp32)
    assert results["bit_exact"]["losses"] == results["unbucketed"]["losses"]
    _assert_same_state(results["bit_exact"]["state"], results["unbucketed"]["state"], atol=0, rtol=0)
    torch.testing.assert_close(results["fully_shard"]["losses"], results["unbucketed"]["losses"], **fp32)
    disagree = results["ranks disagree"]["error"]
    assert disagree and "would issue different collectives" in disagree and "collective #" in disagree, disagree
    cost = results["measure"]["cost"]
    assert cost.source == "measured on 2 ranks (cpu)" and cost.latency_s > 0 and cost.bandwidth > 0, cost

    # Mixed precision: bf16 compute (losses not fp32's), fp32 master weights and reduction (near fp32's).
    bf16 = results["bf16 fully_shard eager"]
    assert bf16["param_dtypes"] == {torch.float32}
    torch.testing.assert_close(bf16["losses"], want_losses, atol=5e-2, rtol=1e-2)
    assert bf16["losses"] != want_losses

    # Resumed at step RESUME_AT with the optimizer's state: the uninterrupted run's losses.
    for name in ("resume 1 -> 2", "resume 2 -> 2"):
        torch.testing.assert_close(results[name]["losses"], want_losses[RESUME_AT:], msg=name, **fp32)
        _assert_same_state(results[name]["state"], want_state, **fp32)
    torch.testing.assert_close(_resume_one_process(str(tmp_path / "two_ranks_at_k")), want_losses[RESUME_AT:],
                               msg="resume 2 -> 1", **fp32)

    # The checkpoint saved by the two ranks loads in this process, into the plain model.
    model = get("llama-tiny").build()
    load_checkpoint(model, str(tmp_path / "fully_shard"))
    _assert_same_state(model.state_dict(), results["fully_shard"]["state"], atol=0, rtol=0)

    # Rank 1 died: rank 0 raised an error naming it within its watch's window, instead of hanging.
    dead = results["dead rank"]
    assert dead["error"] is not None and dead["ranks"] == [1], dead
    assert "Rank 1 stopped its heartbeat" in dead["error"] and "checkpoint" in dead["error"], dead["error"]
    assert dead["seconds"] < WATCH["timeout_s"], dead


# -- RankWatch in one process: a HashStore stands for the process group's store ----------------


def _watch_with_peers(heartbeats: dict[int, str], **options):
    """Rank 0's watch in a world of 3, with the other ranks' heartbeats frozen at `heartbeats`
    ("counter,step,finished"; a rank left out never started its watch)."""
    from fvcompile.fsdp import RankWatch

    store = dist.HashStore()
    for rank, value in heartbeats.items():
        store.set(f"fvcompile/rankwatch/{rank}", value)
    return RankWatch(**{"timeout_s": 30.0, "heartbeat_s": 0.02, **options}, store=store, rank=0, world_size=3)


def test_rank_watch_names_the_dead_and_the_missing_rank_and_the_checkpoint():
    from fvcompile.fsdp import RankFailure

    with _watch_with_peers({1: "7,2,0"}) as watch:  # rank 1's counter never moves: dead
        watch.checkpointed("ckpt/step2", 2)
        with pytest.raises(RankFailure) as failure, watch.step(3):
            raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4000. GLHF!")
    assert failure.value.ranks == [1, 2]
    message = str(failure.value)
    assert message.startswith("rank 0 at step 3: Connection closed by peer [127.0.0.1]:4000. "), message
    for part in ("Rank 1 stopped its heartbeat (last at step 2)", "rank 2 never started its watch",
                 "'ckpt/step2' (after step 2)"):
        assert part in message


def test_rank_watch_leaves_errors_alone_when_every_rank_lives():
    with _watch_with_peers({1: "7,3,1", 2: "1,4,1"}) as watch:  # both finished, at or past step 3
        with pytest.raises(ValueError, match="a bug"), watch.step(3):
            raise ValueError("a bug")  # not a distributed error: raised at once, unchanged
        with pytest.raises(RuntimeError) as error, watch.step(3):
            raise RuntimeError("Connection closed by peer")
    assert "every rank's heartbeat is alive" in error.value.__notes__[0]


def test_rank_watch_names_the_rank_a_stalled_step_waits_for(capsys):
    # on_stall="exit" would exit this process: "warn" prints the same error.
    with _watch_with_peers({1: "7,1,0", 2: "1,3,1"}, timeout_s=0.1, on_stall="warn") as watch:
        with watch.step(3):
            time.sleep(0.5)  # blocked, as in a collective whose peer is gone
    stderr = capsys.readouterr().err
    assert "RankFailure: rank 0 at step 3: the step has run for more than 0.1 s. Rank 1 stopped" in stderr, stderr
