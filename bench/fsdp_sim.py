"""The cluster simulation of SimpleFSDP: Llama 3 8B / 70B / 405B on 8, 64 and 512 H100s,
predicted from the real post-grad graphs, with no GPU and no memory.

    python bench/fsdp_sim.py --out bench/results/            # every cell (its run time: bench/README.md)
    python bench/fsdp_sim.py --blocks 6,8                    # quicker, less exact for `ours` (module docstring)
    python bench/fsdp_sim.py --models llama3-8b --gpus 8     # one cell
    python bench/fsdp_sim.py --calibrate --out $OUT          # on a lent GPU: measured compute

What is traced: each model wrapped by `fvcompile.fsdp.simple_fsdp` (fully_shard over a 1-D mesh
of N ranks, bf16 compute, fp32 reduction: TorchTitan's mixed precision), one training step
(forward, next-token loss, backward) at sequence 8192, local batch 1, through `torch.compile`
with `PassTestBackend(codegen=False)`; fake tensors (`FakeTensorMode`) and a fake process group
of N ranks stand for the cluster. A recording pass keeps the post-grad forward and backward
graphs. Tracing costs the same seconds per block at any width, so the script traces 12 and 14
blocks at full width and extrapolates the repeated blocks: a figure for L blocks is
`x(14) + (L - 14) * (x(14) - x(12)) / 2`. Two blocks apart, not one: the cost model's buckets may
span two blocks, so one more block can change the plan's phase; and not from fewer blocks, where
the schedule has not reached its steady pattern yet: `fsdp_reordering` leaves the collectives
near the backward's peak memory in place, a count that grows with the first blocks and then
stays (bench/README.md has the counts), so an extrapolation from too few blocks charges every
block with them (`--check MODEL:GPUS:BLOCKS` traces that many blocks and compares them with the
extrapolation).

Three schedules of the same graph, each simulated by `passes/fsdp_timeline.py` with the cost
model of the cluster (`CostModel.preset`: "h100_nvlink" inside one 8-GPU node, "h100_infiniband"
across nodes, where a ring is as fast as its slowest link):
- none: the graph as traced: one all-gather and one reduce-scatter per parameter, each waited on
  right after it starts;
- ours: `FSDPBucketing()` (buckets from the cost model of that cluster) then `FSDPReordering()`
  (one bucket ahead where that does not raise the graph's peak memory);
- fsdp2: FSDP2's per-module prefetch: `FSDPBucketing(plan=[embedding, norm and output] + one
  bucket per block)` then `FSDPReordering(keep_peak=False)` (one bucket ahead, always): FSDP2
  gathers one wrapped block at a time and prefetches the next.
The passes run on copies of the recorded graph, as the pass manager runs them at the post-grad
hook (the same code on the same graph, without tracing each schedule again).

Step time: the forward's and the backward's simulated time (the optimizer step is not in the
graphs: not counted). Peak memory per GPU: the sharded fp32 parameters, gradients and AdamW's two
moments (16 bytes per parameter / N), plus the larger of the forward's and the backward's peak in
a liveness walk over the graph (`fsdp_timeline.memory_walk`: activations, gathered bf16
parameters and unreduced gradients alive at once, in graph order, before Inductor's buffer
reuse; the backward holds the forward's saved activations from its start).

--calibrate times one transformer block (forward + backward, bf16) of each model on CUDA and
scales the preset's compute constants so that the modelled block takes the measured time; the
figures then say "compute measured". Without CUDA it says so and keeps the preset ("modelled").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import fx

ROOT = Path(__file__).resolve().parents[1]

import fvcompile  # noqa: E402
from fvcompile.fsdp import MixedPrecisionPolicy, simple_fsdp  # noqa: E402
from fvcompile.models.llama import Block, Llama, LlamaConfig, next_token_loss, rope_tables  # noqa: E402
from fvcompile.passes.base import PassContext  # noqa: E402
from fvcompile.passes.fsdp_bucketing import FSDPBucketing  # noqa: E402
from fvcompile.passes.fsdp_cost import CostModel  # noqa: E402
from fvcompile.passes.fsdp_reordering import FSDPReordering  # noqa: E402
from fvcompile.passes.fsdp_timeline import memory_walk, saved_activations, simulate  # noqa: E402
from fvcompile.pass_manager import collective_groups  # noqa: E402
from fvcompile.testing import PassTestBackend  # noqa: E402

# Llama 3 (arXiv 2407.21783, Table 3): dim, layers, heads, FFN width; 8 KV heads, vocab 128256.
MODELS = {
    "llama3-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336),
    "llama3-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672),
    "llama3-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_hidden=53248),
}
GIB = 2**30
SEQ_LEN, LOCAL_BATCH = 8192, 1  # TorchTitan's Llama 3 training configs
GPUS_PER_NODE = 8
TRACED_BLOCKS = (12, 14)  # two apart, past the first blocks (module docstring)
SCHEDULES = ("none", "ours", "fsdp2")
MIXED_PRECISION = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
HBM_BYTES = 80 * GIB  # an H100 SXM's nominal memory (a little less is usable)

# What the paper reports (SimpleFSDP, arXiv 2411.00284), quoted with where it was read.
PAPER = {
    "source": "arXiv 2411.00284 abstract (https://arxiv.org/abs/2411.00284; read via arxiv.org/html/2411.00284v1)",
    "claims": "up to 28.54% memory reduction and 68.67% throughput improvement compared to FSDP2 eager, "
              "on Llama 3 models (including 405B) with TorchTitan, when composed with other distributed "
              "training techniques",
    "per_model": None,  # the per-model tables were not found in the stored sources
}


# ---- tracing -----------------------------------------------------------------------------------

class KeepGraphs(fvcompile.GraphPass):
    """Changes nothing: keeps each post-grad graph it sees (forward and backward)."""

    name = "keep_graphs"
    hook = "post_grad"

    def __init__(self):
        self.graphs: dict[str, fx.GraphModule] = {}

    def run(self, gm, ctx):
        self.graphs[ctx.graph_kind] = copy_module(gm)
        return fvcompile.PassResult()


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose nodes can be moved and replaced; the fake values are shared, not copied."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def trace(cfg: LlamaConfig, blocks: int, world: int) -> dict[str, fx.GraphModule]:
    """The post-grad forward and backward graphs of one training step of `cfg` cut to `blocks`
    blocks, wrapped by simple_fsdp over `world` fake ranks, on fake tensors."""
    from torch._subclasses import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    torch._dynamo.reset()
    try:
        mesh = init_device_mesh("cpu", (world,))  # outside the fake mode: the mesh holds real ranks
        with FakeTensorMode():
            model = Llama(dataclasses.replace(cfg, n_layers=blocks, max_seq_len=SEQ_LEN))
            simple_fsdp(model, mesh, mp_policy=MIXED_PRECISION)
            keep = KeepGraphs()
            compiled = torch.compile(model, backend=PassTestBackend(keep, codegen=False), fullgraph=True)
            tokens = torch.randint(0, cfg.vocab_size, (LOCAL_BATCH, SEQ_LEN + 1))
            next_token_loss(compiled, tokens).backward()
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()
    return keep.graphs


def parameter_count(cfg: LlamaConfig) -> int:
    """The model's parameters, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Llama(dataclasses.replace(cfg, max_seq_len=16)).parameters())


# ---- schedules -----------------------------------------------------------------------------------

def fsdp2_plan(blocks: int) -> list[list[str]]:
    """FSDP2 as TorchTitan wraps Llama: the root (embedding, final norm, output) and each block."""
    return [["tok_embeddings", "norm", "output"]] + [[f"layers.{i}"] for i in range(blocks)]


def schedule_passes(schedule: str, cost: CostModel, blocks: int) -> list[fvcompile.GraphPass]:
    if schedule == "none":
        return []
    if schedule == "ours":
        return [FSDPBucketing(cost=cost), FSDPReordering(cost=cost)]
    return [FSDPBucketing(plan=fsdp2_plan(blocks), cost=cost), FSDPReordering(cost=cost, keep_peak=False)]


def apply_passes(graphs: dict[str, fx.GraphModule], passes, world: int) -> dict[str, fx.GraphModule]:
    """Copies of the forward and backward graphs after `passes`, run as the pass manager runs them
    at the post-grad hook (one store shared by the two graphs of the compile)."""
    store: dict = {}
    out = {}
    for kind in ("forward", "backward"):
        gm = copy_module(graphs[kind])
        ctx = PassContext(graph_kind=kind, device=torch.device("cpu"), hook="post_grad", rank=0,
                          world_size=world, process_groups=collective_groups(gm.graph), store=store)
        for p in passes:
            p.run(gm, ctx)
            gm.graph.lint()
        out[kind] = gm
    return out


# ---- measuring a schedule ------------------------------------------------------------------------

def evaluate(graphs: dict[str, fx.GraphModule], cost: CostModel) -> dict:
    """Step time, communication and graph memory of one schedule (seconds, bytes)."""
    fwd, bwd = simulate(graphs["forward"].graph, cost), simulate(graphs["backward"].graph, cost)
    saved = saved_activations(graphs["backward"].graph)
    mem_f = memory_walk(graphs["forward"].graph, count_outputs=True)
    mem_b = memory_walk(graphs["backward"].graph, counted_inputs=saved, count_outputs=False)
    return {
        "step_s": fwd.step_s + bwd.step_s,
        "compute_s": fwd.compute_s + bwd.compute_s,
        "comm_s": fwd.comm_s + bwd.comm_s,
        "exposed_comm_s": fwd.exposed_comm_s + bwd.exposed_comm_s,
        "collectives": len(fwd.collectives) + len(bwd.collectives),
        "graph_peak_bytes": max(mem_f.peak_bytes, mem_b.peak_bytes),
        "peak_in": "forward" if mem_f.peak_bytes >= mem_b.peak_bytes else "backward",
    }


def extrapolate(by_blocks: dict[int, dict], layers: int) -> dict:
    """A figure for `layers` blocks from the traced ones: the last traced value plus the
    difference one more block made, times the blocks not traced."""
    (k0, a), (k1, b) = sorted(by_blocks.items())[-2:]
    out = {}
    for key, value in b.items():
        if isinstance(value, (int, float)):
            per_block = (value - a[key]) / (k1 - k0)
            out[key] = value + (layers - k1) * per_block
            out[key] = type(value)(round(out[key])) if isinstance(value, int) else out[key]
        else:
            out[key] = value
    return out


def cluster_cost(world: int) -> CostModel:
    """NVLink inside one node; across nodes a ring runs at the InfiniBand links' pace."""
    return CostModel.preset("h100_nvlink" if world <= GPUS_PER_NODE else "h100_infiniband")


# ---- calibration -----------------------------------------------------------------------------

def time_block(cfg: LlamaConfig, device: str, repeats: int = 5) -> float:
    """Seconds of one block's forward and backward in bf16 at SEQ_LEN tokens (the median)."""
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 405B block is 13 GB in fp32
        block = Block(cfg).to(dtype=torch.bfloat16)
    cos, sin = (t.to(device) for t in rope_tables(cfg.head_dim, SEQ_LEN, cfg.rope_base))
    x = torch.randn(LOCAL_BATCH, SEQ_LEN, cfg.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    times = []
    for i in range(repeats + 2):  # two warm-up runs
        sync(device)
        start = time.perf_counter()
        block(x, cos, sin).sum().backward()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    del block, x
    if device == "cuda":
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def calibrated(cost: CostModel, modelled_block_s: float, measured_block_s: float, device_name: str) -> CostModel:
    """`cost` with its compute constants scaled so that a block takes the measured time."""
    scale = measured_block_s / modelled_block_s
    return dataclasses.replace(cost, flops_per_s=cost.flops_per_s / scale, bytes_per_s=cost.bytes_per_s / scale,
                               op_overhead_s=cost.op_overhead_s * scale,
                               source=f"{cost.source}, compute calibrated on {device_name}")


# ---- one model -----------------------------------------------------------------------------------

def simulate_model(name: str, cfg: LlamaConfig, worlds: list[int], blocks: tuple[int, int], calibrate: bool,
                   log) -> list[dict]:
    """Every schedule of one model on every cluster size: rows of the table."""
    params = parameter_count(cfg)
    measured = None
    rows = []
    for world in worlds:
        traced = {}
        for k in blocks:
            start = time.perf_counter()
            traced[k] = trace(cfg, k, world)
            log(f"  {name}: traced {k} blocks over {world} fake ranks in {time.perf_counter() - start:.0f} s")
        cost = cluster_cost(world)
        if calibrate and measured is None:
            measured = calibrate_block(name, cfg, traced, cost, log)
        if measured is not None:
            cost = calibrated(cost, measured["modelled_block_s"], measured["measured_block_s"], measured["device"])
        for schedule in SCHEDULES:
            by_blocks = {k: evaluate(apply_passes(traced[k], schedule_passes(schedule, cost, k), world), cost)
                         for k in blocks}
            rows.append(make_row(name, cfg, params, world, schedule, cost, by_blocks, measured))
    return rows


def calibrate_block(name: str, cfg: LlamaConfig, traced: dict, cost: CostModel, log) -> dict | None:
    """The measured and modelled seconds of one block, or None without CUDA."""
    if not torch.cuda.is_available():
        log(f"  {name}: --calibrate: no CUDA device here; compute stays the preset's (modelled)")
        return None
    (k0, a), (k1, b) = sorted((k, evaluate(g, cost)["compute_s"]) for k, g in traced.items())
    measured = time_block(cfg, "cuda")
    device = torch.cuda.get_device_name()
    modelled = (b - a) / (k1 - k0)
    log(f"  {name}: one block fwd+bwd measured {measured * 1e3:.2f} ms on {device}, modelled {modelled * 1e3:.2f} ms")
    return {"device": device, "measured_block_s": measured, "modelled_block_s": modelled}


def make_row(name, cfg, params, world, schedule, cost, by_blocks, measured) -> dict:
    full = extrapolate(by_blocks, cfg.n_layers)
    static = 16 * params / world  # fp32 parameters, gradients, AdamW's two moments: sharded
    peak = static + full["graph_peak_bytes"]
    return {
        "model": name, "gpus": world, "nodes": max(1, world // GPUS_PER_NODE), "schedule": schedule,
        "params": params, "cost_model": cost.describe(),
        "compute": "measured" if measured else "modelled", "communication": "modelled", "memory": "modelled",
        **{k: v for k, v in full.items()},
        "sharded_state_bytes": static, "peak_bytes_per_gpu": peak, "fits_80gb": peak <= HBM_BYTES,
        "tokens_per_s_per_gpu": SEQ_LEN * LOCAL_BATCH / full["step_s"],
        "traced_blocks": {str(k): v for k, v in by_blocks.items()},
        "extrapolated_from_blocks": sorted(by_blocks), "layers": cfg.n_layers,
    }


def check_extrapolation(rows: list[dict], spec: str, log) -> list[dict]:
    """Trace the blocks `spec` ("MODEL:GPUS:BLOCKS") names, and set each schedule's simulated
    figures beside the ones extrapolated from the traced blocks of that row."""
    model, world, blocks = spec.split(":")
    world, blocks = int(world), int(blocks)
    mine = [r for r in rows if (r["model"], r["gpus"]) == (model, world)]
    if not mine:
        raise SystemExit(f"--check {spec}: no row of {model} on {world} GPUs was simulated")
    start = time.perf_counter()
    traced = trace(MODELS[model], blocks, world)
    log(f"  check: traced {blocks} blocks of {model} over {world} fake ranks in {time.perf_counter() - start:.0f} s")
    cost = cluster_cost(world)
    out = []
    for r in mine:
        by_blocks = {int(k): v for k, v in r["traced_blocks"].items()}
        predicted = extrapolate(by_blocks, blocks)
        actual = evaluate(apply_passes(traced, schedule_passes(r["schedule"], cost, blocks), world), cost)
        out.append({"model": r["model"], "gpus": world, "schedule": r["schedule"], "blocks": blocks,
                    **{f"{key}_error": predicted[key] / actual[key] - 1
                       for key in ("step_s", "exposed_comm_s", "graph_peak_bytes") if actual[key]},
                    "extrapolated": predicted, "traced": actual})
    return out


# ---- output --------------------------------------------------------------------------------------

def compare_to_fsdp2(rows: list[dict]) -> None:
    """Each row's throughput and memory against the fsdp2 schedule of the same model and cluster."""
    base = {(r["model"], r["gpus"]): r for r in rows if r["schedule"] == "fsdp2"}
    for r in rows:
        b = base[(r["model"], r["gpus"])]
        r["throughput_vs_fsdp2"] = b["step_s"] / r["step_s"] - 1
        r["memory_vs_fsdp2"] = r["peak_bytes_per_gpu"] / b["peak_bytes_per_gpu"] - 1


def markdown(rows: list[dict], meta: dict) -> str:
    label = "measured compute, modelled communication and memory" if any(
        r["compute"] == "measured" for r in rows) else "modelled (no figure here is measured)"
    k0, k1 = meta["traced_blocks"]
    lines = [
        f"# SimpleFSDP cluster simulation ({meta['date']})", "",
        f"Every figure: {label}. Traced: {k0} and {k1} blocks at full width per model and cluster size; the "
        f"other blocks extrapolated (x({k1}) + (L-{k1}) * (x({k1}) - x({k0})) / {k1 - k0}). Sequence "
        f"{SEQ_LEN}, local batch {LOCAL_BATCH}, bf16 compute / fp32 reduction, no activation checkpointing, "
        "optimizer step not counted. Memory: sharded fp32 params + grads + AdamW (16 B/param / N) + the "
        "graph's liveness peak (activations, gathered bf16 buckets, unreduced gradients).", "",
        "| model | GPUs | schedule | collectives | step (s) | compute (s) | exposed comm (s) | comm total (s) | "
        "peak mem/GPU (GiB) | fits 80 GiB | tokens/s/GPU | vs fsdp2 throughput | vs fsdp2 memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['schedule']} | {r['collectives']} | {r['step_s']:.3f} | "
            f"{r['compute_s']:.3f} | {r['exposed_comm_s']:.3f} | {r['comm_s']:.3f} | {r['peak_bytes_per_gpu'] / GIB:.1f} | "
            f"{'yes' if r['fits_80gb'] else 'no'} | {r['tokens_per_s_per_gpu']:.0f} | "
            f"{r['throughput_vs_fsdp2']:+.1%} | {r['memory_vs_fsdp2']:+.1%} |")
    for c in meta.get("extrapolation_check", []):
        errors = ", ".join(f"{k[:-6]} {v:+.1%}" for k, v in c.items() if k.endswith("_error"))
        lines.append(f"Extrapolation check, {c['model']} on {c['gpus']} GPUs, {c['schedule']}: {c['blocks']} blocks "
                     f"traced vs extrapolated: {errors}")
    lines += ["", "Cost models: " + "; ".join(sorted({f"{r['gpus']} GPUs: {r['cost_model']}" for r in rows})),
              "", f"Paper (SimpleFSDP vs FSDP2 eager): {PAPER['claims']} ({PAPER['source']}).", ""]
    return "\n".join(lines)


def write(rows: list[dict], meta: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fsdp_sim_{meta['date']}"
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(markdown(rows, meta))
    js.write_text(json.dumps({"meta": meta, "paper": PAPER, "rows": rows}, indent=1, default=str))
    return md, js


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--gpus", default="8,64,512", help="cluster sizes, comma-separated")
    p.add_argument("--blocks", default=",".join(map(str, TRACED_BLOCKS)),
                   help="the two block counts traced per model and cluster (module docstring)")
    p.add_argument("--calibrate", action="store_true", help="time one block per model on CUDA (when there is one)")
    p.add_argument("--check", metavar="MODEL:GPUS:BLOCKS",
                   help="also trace that many blocks of that model and cluster, against the extrapolation")
    p.add_argument("--out", type=Path, help="write fsdp_sim_<date>.md and .json into this folder")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; the models are {', '.join(MODELS)}")
    worlds = [int(g) for g in args.gpus.split(",")]
    blocks = tuple(int(k) for k in args.blocks.split(","))
    if len(blocks) != 2 or not 1 <= blocks[0] < blocks[1]:
        raise SystemExit(f"--blocks takes two block counts, fewer first, e.g. 12,14; got {args.blocks!r}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        rows += simulate_model(name, MODELS[name], worlds, blocks, args.calibrate, log)
    compare_to_fsdp2(rows)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "seq_len": SEQ_LEN,
            "local_batch": LOCAL_BATCH, "traced_blocks": list(blocks), "seconds": time.perf_counter() - start,
            "calibrated": any(r["compute"] == "measured" for r in rows)}
    if args.check:
        meta["extrapolation_check"] = check_extrapolation(rows, args.check, log)
    print(markdown(rows, meta))
    if args.out:
        for path in write(rows, meta, args.out):
            log(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
