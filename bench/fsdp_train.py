"""Train a registered model with FSDP on several ranks and measure each step: loss, time,
collectives issued and peak memory per rank. One run, one configuration; `bench/fsdp.py`
compares configurations by calling `run(parse_args([...]))`, which returns the result dict.

    torchrun --nproc-per-node 2 bench/fsdp_train.py --impl simple_fsdp --compile fvcompile --passes auto
    python bench/fsdp_train.py --nproc 2 --impl fsdp2 --steps 8 --json out.json   # spawns its gloo ranks
    python bench/fsdp_train.py --nproc 2 --steps 6 --save-at 3 --checkpoint /tmp/ck   # then:
    python bench/fsdp_train.py --nproc 1 --steps 6 --resume /tmp/ck                 # steps 3..5, on 1 rank

What each figure is:
- loss: the global loss of a step (the mean of the ranks' losses on equal parts of the batch).
  The global batch of step s is a function of s only (block s mod POOL of a pool drawn once
  with a fixed seed), so a resumed run, on any number of ranks, trains on the same data.
- step time: forward, backward and optimizer step of one rank (CUDA synchronized), timed on
  rank 0; the median leaves out the first --warmup steps (compilation) and the profiled steps.
- collectives per step: in the last profiled step, the process-group operations the
  profiler records (`c10d::*`, one per collective handed to the backend, whether eager code or a
  compiled graph issued it), by kind. The loss's all-reduce lies outside the profiled region.
- peak memory per rank: on CUDA, `torch.cuda.max_memory_allocated` over the run. On CPU, which
  keeps no allocator statistics, the median over the last --profile-steps steps, each profiled
  on its own, of: the bytes of the tensors alive at the start of the profiled
  step that the run owns (parameters, gradients, optimizer state, buffers: measured from the
  tensors) plus the peak of the running sum of the CPU allocator's allocations and frees that
  the profiler records during that step (Inductor's compiled code allocates its buffers through
  that allocator, so they count; scratch memory inside a C++ kernel, Python objects and the
  frees of blocks allocated before the step do not). The median, because the gloo threads'
  buffers (a reduce-scatter copies its input) come and go at times that vary by a few MiB.
- --inductor-bucketing / --inductor-overlap turn on PyTorch's own FX bucketing and overlap
  scheduling (`torch._inductor.config`) for the run; when compiling with them fails, the error
  is recorded in the result (`inductor_options`: `error`, `errors`) and the run goes on with
  fewer of them (bucketing alone, then none; `applied` says which ran).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

POOL = 8  # distinct global batches; step s trains on batch s % POOL
STEP_FILE = "fsdp_train.json"  # beside the DCP files of a checkpoint: the step it resumes at
COLLECTIVE_KINDS = {"allgather": "all_gather", "reduce_scatter": "reduce_scatter", "allreduce": "all_reduce",
                    "broadcast": "broadcast", "alltoall": "all_to_all", "barrier": "barrier"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help="a registered model (fvcompile models)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the model's config, e.g. --config n_layers=8 --config dim=256")
    p.add_argument("--impl", choices=("fsdp2", "simple_fsdp"), default="simple_fsdp")
    p.add_argument("--mode", choices=("fully_shard", "replicate", "hybrid_shard"), default="fully_shard")
    p.add_argument("--replicas", type=int, default=1, help="hybrid_shard: the mesh's replicate dimension")
    p.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mp", choices=("none", "bf16"), default="none",
                   help="bf16: compute in bf16, reduce gradients in fp32, fp32 master weights")
    p.add_argument("--compile", choices=("none", "inductor", "fvcompile"), default="none")
    p.add_argument("--passes", default="auto", type=_passes,
                   help="fvcompile.optimize's passes= (with --compile fvcompile): auto, none, or names a,b")
    p.add_argument("--inductor-bucketing", action="store_true",
                   help="PyTorch's bucket_all_gathers_fx and bucket_reduce_scatters_fx = 'all'")
    p.add_argument("--inductor-overlap", action="store_true",
                   help="PyTorch's reorder_for_compute_comm_overlap and overlap scheduling")
    p.add_argument("--steps", type=int, default=8, help="train until this step (resumed runs too)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median step time")
    p.add_argument("--profile-steps", type=int, default=1,
                   help="the last steps profiled (memory: their median; left out of the step time)")
    p.add_argument("--batch", type=int, default=8, help="global batch size (a multiple of the ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-at", type=int, help="save model and optimizer after this many steps")
    p.add_argument("--checkpoint", help="the folder --save-at writes")
    p.add_argument("--resume", help="a folder --save-at wrote: continue from its step")
    p.add_argument("--watchdog-timeout", type=float,
                   help="seconds a step may run before fvcompile.fsdp.RankWatch looks for a dead rank")
    p.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, help="torch threads per rank on CPU (default: cores / ranks)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quiet", action="store_true", help="no line per step")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _passes(text: str):
    """'auto', 'none' (no pass: one collective per parameter) or comma-separated pass names."""
    if text == "auto":
        return "auto"
    return [] if text == "none" else [name for name in text.split(",") if name]


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.save_at is not None and not args.checkpoint:
        parser.error("--save-at K writes into --checkpoint DIR: name the folder")
    if args.impl == "fsdp2" and args.mode == "replicate":
        parser.error("FSDP2 shards: --mode replicate is simple_fsdp's (--impl simple_fsdp), or use DDP")
    if args.compile != "fvcompile" and args.passes != "auto":
        parser.error("--passes goes to fvcompile.optimize: add --compile fvcompile")
    if (args.inductor_bucketing or args.inductor_overlap) and args.compile == "none":
        parser.error("--inductor-bucketing/--inductor-overlap change compiled graphs: add --compile inductor or fvcompile")


# -- entry points -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Train and measure; returns the result (see the module's docstring). Under torchrun this
    process is one rank; otherwise it spawns `args.nproc` gloo ranks on CPU and returns rank 0's."""
    if "RANK" in os.environ:  # torchrun
        return _run_rank(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), store=None)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_spawned_rank, args=(args, args.nproc, tmp), nprocs=args.nproc, start_method="spawn")
        return json.loads(Path(tmp, "result.json").read_text())


def _spawned_rank(rank: int, args: argparse.Namespace, world_size: int, tmp: str) -> None:
    result = _run_rank(args, rank, world_size, store=dist.FileStore(f"{tmp}/store", world_size))
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if "RANK" not in os.environ or int(os.environ["RANK"]) == 0:
        print_summary(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return result


# -- one rank -----------------------------------------------------------------------------------


def _run_rank(args: argparse.Namespace, rank: int, world_size: int, store) -> dict:
    device = _init_distributed(args, rank, world_size, store)
    try:
        spec, model = build_model(args, device)
        model = wrap(model, args, device, world_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        start = resume(model, optimizer, args.resume) if args.resume else 0
        pool = batch_pool(spec, model, args)
        with _watch(args) as watch:
            record = train(model, optimizer, spec, pool, args, start, rank, world_size, device, watch)
        record["peak_memory_bytes"] = _gather(record.pop("peak_memory_bytes"))
        return {**describe(args, device, world_size), **record}
    finally:
        dist.destroy_process_group()


def _watch(args):
    """fvcompile.fsdp.RankWatch with --watchdog-timeout (a dead rank named in an error), else nothing."""
    if not args.watchdog_timeout:
        return nullcontext(None)
    from fvcompile.fsdp import RankWatch

    return RankWatch(timeout_s=args.watchdog_timeout)


def _init_distributed(args, rank: int, world_size: int, store) -> torch.device:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    kwargs = {} if store is None else {"store": store, "rank": rank, "world_size": world_size}
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10), **kwargs)
    return device


def build_model(args, device: torch.device):
    """The registered model on `device`, with --config overrides of its config dataclass."""
    from fvcompile.models import get

    spec = get(args.model)
    torch.manual_seed(args.seed)  # every rank builds the same weights (simple_fsdp also takes rank 0's)
    if not args.config:
        return spec, spec.build().to(device)
    config = spec.extra.get("config") if spec.extra else None
    if not dataclasses.is_dataclass(config):
        raise SystemExit(f"--config: {args.model} has no config dataclass to override (spec.extra['config'])")
    overrides = {}
    for item in args.config:
        key, _, value = item.partition("=")
        if not hasattr(config, key):
            raise SystemExit(f"--config {item}: {type(config).__name__} has no field {key!r}")
        overrides[key] = _literal(value)
    with torch.device("meta"):
        model_class = type(spec.build())
    return spec, model_class(dataclasses.replace(config, **overrides)).to(device)


def _literal(text: str):
    """"8" -> 8, "1e4" -> 10000.0, "True" -> True, "relu2" -> "relu2"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def wrap(model: torch.nn.Module, args, device: torch.device, world_size: int) -> torch.nn.Module:
    """FSDP2 (`fully_shard` on each block, then the root) or simple_fsdp, in --mode."""
    from torch.distributed.device_mesh import init_device_mesh

    hybrid = args.mode == "hybrid_shard"
    if hybrid and world_size % args.replicas:
        raise SystemExit(f"--replicas {args.replicas} does not divide the {world_size} ranks")
    mesh = init_device_mesh(device.type, (args.replicas, world_size // args.replicas) if hybrid else (world_size,))
    bf16 = args.mp == "bf16"
    if args.impl == "simple_fsdp":
        from fvcompile.fsdp import MixedPrecisionPolicy, simple_fsdp

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        return simple_fsdp(model, mesh, mode=args.mode, mp_policy=policy,
                           reshard_after_forward=args.reshard_after_forward)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # None: FSDP2's default, reshard every block but not the root, whose parameters the backward needs first.
    options = {"mesh": mesh, "reshard_after_forward": None if args.reshard_after_forward else False}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in _blocks(model):
        fully_shard(block, **options)
    return fully_shard(model, **options)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 wraps one by one: the modules of the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def compiled(model: torch.nn.Module, args):
    """The module the steps call: `model` itself, torch.compile'd, or fvcompile.optimize'd."""
    fullgraph = args.impl == "simple_fsdp"  # FSDP2's hooks break graphs
    if args.compile == "inductor":
        return torch.compile(model, fullgraph=fullgraph)
    if args.compile == "fvcompile":
        import fvcompile

        return fvcompile.optimize(model, fullgraph=fullgraph, passes=args.passes)
    return model


def inductor_knobs(args) -> dict:
    """PyTorch's own bucketing and overlap options asked for (empty: none)."""
    knobs = {}
    if args.inductor_bucketing:
        knobs.update({"bucket_all_gathers_fx": "all", "bucket_reduce_scatters_fx": "all"})
    if args.inductor_overlap:
        knobs.update({"reorder_for_compute_comm_overlap": True,
                      "aten_distributed_optimizations.enable_overlap_scheduling": True})
    return knobs


def _fewer_knobs(args) -> list[dict]:
    """The options to fall back to, in order, when compiling with those asked fails."""
    fallbacks = []
    if args.inductor_bucketing and args.inductor_overlap:
        fallbacks.append(inductor_knobs(argparse.Namespace(inductor_bucketing=True, inductor_overlap=False)))
    return fallbacks + [{}]


def resume(model, optimizer, folder: str) -> int:
    """Load model and optimizer from `folder`; returns the step to continue at."""
    from fvcompile.fsdp import load_checkpoint

    load_checkpoint(model, folder, optimizer)
    return json.loads(Path(folder, STEP_FILE).read_text())["step"]


def save(model, optimizer, folder: str, step: int) -> None:
    from fvcompile.fsdp import save_checkpoint

    save_checkpoint(model, folder, optimizer)
    if dist.get_rank() == 0:
        Path(folder, STEP_FILE).write_text(json.dumps({"step": step}))
    dist.barrier()


def save_if_asked(model, optimizer, args, step: int, watch) -> None:
    """Save before `step` when it is --save-at's."""
    if args.save_at == step:
        save(model, optimizer, args.checkpoint, step)
        if watch:
            watch.checkpointed(args.checkpoint, step)


def batch_pool(spec, model, args) -> tuple[torch.Tensor, ...]:
    """POOL global batches, the same on every rank (seeded), stacked along dim 0."""
    if args.batch % dist.get_world_size():
        raise SystemExit(f"--batch {args.batch} does not split over {dist.get_world_size()} ranks")
    torch.manual_seed(args.seed)
    return spec.train_batch(model, args.batch * POOL)


def local_batch(pool, args, step: int, rank: int, world_size: int) -> tuple:
    block = step % POOL
    return tuple(t[block * args.batch:(block + 1) * args.batch].chunk(world_size)[rank] for t in pool)


# -- the training loop --------------------------------------------------------------------------


def train(model, optimizer, spec, pool, args, start: int, rank: int, world_size: int, device, watch) -> dict:
    """Steps start..args.steps-1, the last --profile-steps profiled. Returns losses, times,
    collectives, this rank's peak memory and the fate of PyTorch's options."""
    losses, times, last, profiled = [], [], None, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with Steps(model, optimizer, spec, args, device) as steps:
        for step in range(start, args.steps):
            save_if_asked(model, optimizer, args, step, watch)
            with watch.step(step) if watch else nullcontext():
                last = steps.run(local_batch(pool, args, step, rank, world_size),
                                 profiled=step >= args.steps - args.profile_steps)
                loss = global_mean(last.loss)
            if last.profile:
                profiled.append(last)
            times.append(last.seconds)
            losses.append(loss)
            if rank == 0 and not args.quiet:
                print(f"step {step}: loss {loss:.4f}  {last.seconds * 1e3:.1f} ms", flush=True)
        save_if_asked(model, optimizer, args, args.steps, watch)
    # Leave out this run's warm-up steps (a resumed run compiles again) and the profiled steps (when others are left).
    timed = times[args.warmup:len(times) - len(profiled)] or times[args.warmup:]
    return {"start_step": start, "losses": losses, "step_times_s": times,
            "median_step_s": statistics.median(timed) if timed else None,
            "collectives_per_step": count_collectives(profiled[-1].profile) if profiled else None,
            "peak_memory_bytes": median_peak([peak_memory(r.profile, r.persistent_bytes, device) for r in profiled]),
            "inductor_options": steps.knobs_status}


@dataclasses.dataclass
class StepRecord:
    seconds: float
    loss: torch.Tensor  # this rank's, detached
    profile: object = None  # torch.profiler.profile of a profiled step
    persistent_bytes: int = 0  # a profiled step's: see persistent_bytes()


class Steps:
    """Runs training steps through the module the steps call (compiled as asked), under PyTorch's
    bucketing and overlap options when asked. When compiling with them fails at the first step,
    it records the error in `knobs_status`, compiles with fewer of them (bucketing without
    overlap, then none) and runs the step again; `knobs_status["applied"]` says what ran."""

    def __init__(self, model, optimizer, spec, args, device):
        self.model, self.optimizer, self.spec, self.args, self.device = model, optimizer, spec, args, device
        knobs = inductor_knobs(args)
        self.knobs_status = {"asked": knobs, "applied": knobs, "error": None, "errors": []} if knobs else None
        self._fallbacks = _fewer_knobs(args)
        self._knobs = ExitStack()
        self._compile(knobs)
        self._ran = False

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self._knobs.close()

    def _compile(self, knobs: dict) -> None:
        self._knobs.close()
        self._knobs = ExitStack()
        if knobs:
            self._knobs.enter_context(torch._inductor.config.patch(knobs))
        self.step_model = compiled(self.model, self.args)

    def run(self, batch, profiled: bool) -> StepRecord:
        while True:
            try:
                record = self._step(batch, profiled)
                break
            except Exception as error:
                if not self.knobs_status or self._ran or not self._fallbacks:
                    raise
                message = f"{type(error).__name__}: {str(error).splitlines()[0][:500]}"
                self.knobs_status["errors"].append({"knobs": self.knobs_status["applied"], "error": message})
                self.knobs_status["error"] = self.knobs_status["error"] or message  # the asked set's
                self.knobs_status["applied"] = self._fallbacks.pop(0)
                self.optimizer.zero_grad()
                torch._dynamo.reset()
                self._compile(self.knobs_status["applied"])
        self._ran = True
        return record

    def _step(self, batch, profiled: bool) -> StepRecord:
        """Forward, backward, optimizer step, timed (and profiled)."""
        profile, persistent = None, 0
        if profiled:
            persistent = persistent_bytes(self.model, self.optimizer)
            profile = _profiler(self.device)
        _sync(self.device)
        began = time.perf_counter()
        with profile if profile else nullcontext():
            loss = self.spec.train_step(self.step_model, batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            _sync(self.device)
        return StepRecord(time.perf_counter() - began, loss.detach(), profile, persistent)


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, profile_memory=True)


def global_mean(loss: torch.Tensor) -> float:
    mean = loss.clone()
    dist.all_reduce(mean)
    return mean.item() / dist.get_world_size()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- measurements -------------------------------------------------------------------------------


def count_collectives(profile) -> dict:
    """{kind: count, "total": n} of the process-group operations (`c10d::*`) in the profile."""
    counts = {}
    for event in profile.events():
        if not event.name.startswith("c10d::"):
            continue
        op = event.name[len("c10d::"):].strip("_")
        kind = next((k for key, k in COLLECTIVE_KINDS.items() if op.startswith(key)), op)
        counts[kind] = counts.get(kind, 0) + 1
    counts["total"] = sum(counts.values())
    return counts


def persistent_bytes(model, optimizer) -> int:
    """Bytes of this rank's parameters (their local shards), gradients, buffers and optimizer
    state, each storage counted once."""
    from torch.distributed.tensor import DTensor

    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(model.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or local.device.type == "meta":
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def peak_memory(profile, persistent: int, device) -> dict:
    """This rank's peak memory (bytes) and how it was measured (see the module's docstring)."""
    if device.type == "cuda":
        return {"bytes": torch.cuda.max_memory_allocated(device), "method": "torch.cuda.max_memory_allocated"}
    if profile is None:
        return {"bytes": None, "method": "no profiled step"}
    running = peak = 0
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return {"bytes": persistent + peak, "persistent_bytes": persistent, "step_peak_bytes": peak,
            "method": "persistent tensors + peak of the profiled step's CPU allocator events"}


def median_peak(peaks: list[dict]) -> dict:
    """The profiled step whose peak is the median (the lower middle one of an even count)."""
    if not peaks:
        return {"bytes": None, "method": "no profiled step"}
    ranked = sorted(peaks, key=lambda p: p["bytes"] or 0)
    return dict(ranked[(len(ranked) - 1) // 2], steps=[p["bytes"] for p in peaks])


def _gather(value) -> list:
    """`value` of every rank, in rank order (every rank calls it)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def describe(args, device, world_size: int) -> dict:
    """What ran where: configuration, device, versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import fvcompile

        versions["fvcompile"] = getattr(fvcompile, "__version__", "checkout")
    except ImportError:
        pass
    return {"config": {k: v for k, v in vars(args).items()}, "world_size": world_size,
            "backend": dist.get_backend(), "device": f"{device.type}: {name}",
            "threads_per_rank": torch.get_num_threads(), "versions": versions}


def print_summary(result: dict) -> None:
    config = result["config"]
    print(f"\n{config['impl']} {config['mode']} compile={config['compile']} on {result['world_size']} ranks "
          f"({result['backend']}, {result['device']}, torch {result['versions']['torch']})")
    if result["median_step_s"] is None:
        print(f"no step after the {config['warmup']} warm-up steps: no median step time (raise --steps)")
    else:
        print(f"median step: {result['median_step_s'] * 1e3:.1f} ms (after {config['warmup']} warm-up steps)")
    print(f"collectives per step: {result['collectives_per_step']}")
    peaks = [p["bytes"] for p in result["peak_memory_bytes"]]
    print("peak memory per rank: " + ", ".join("?" if b is None else f"{b / 2**20:.2f} MiB" for b in peaks)
          + f"  ({result['peak_memory_bytes'][0]['method']})")
    options = result["inductor_options"]
    if options:
        for failed in options["errors"]:
            print(f"PyTorch's options {failed['knobs']}: FAILED, {failed['error']}")
        print(f"PyTorch's options the run used: {options['applied'] or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
