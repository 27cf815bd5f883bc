"""How long a graph's compute and its collectives take, estimated from the graph alone.

The FSDP passes plan buckets and prefetches with this model, so it must run anywhere: on a
CPU-only machine, under fake tensors, with a fake process group. Nothing is benchmarked unless
asked:

- compute: a roofline per node, `max(FLOPs / flops_per_s, bytes / bytes_per_s) + op_overhead_s`,
  with FLOPs from PyTorch's own formulas (`torch.utils.flop_counter`) and bytes from the fake
  values of the node's inputs and output (views move nothing);
- communication: `latency_s + bytes * (n - 1) / n / bandwidth` for an all-gather or a
  reduce-scatter over n ranks (a ring moves (n-1)/n of the full tensor through each link), twice
  that for an all-reduce.

`CostModel.preset(name)` gives documented constants (`"cpu_gloo"`, `"h100_nvlink"`,
`"h100_infiniband"`); `CostModel.measure(group)` replaces them by a short measurement on the real
process group and device, agreed across ranks (every rank must plan the same buckets).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils.flop_counter import flop_registry


# Constants of each preset, and where they come from.
PRESETS = {
    # This project's CPU machines: 2 cores, gloo over loopback TCP. Compute: fp32 GEMM on two
    # AVX2 cores; latency and bandwidth: the order of a gloo all-gather between two processes
    # (`fvcompile.passes.fsdp_cost.CostModel.measure` gives this machine's own).
    "cpu_gloo": dict(flops_per_s=5e10, bytes_per_s=1e10, op_overhead_s=5e-6, latency_s=1e-4, bandwidth=2e9),
    # One H100 SXM5 in an 8-GPU node. Compute: bf16 dense peak 989 TFLOP/s at a 60 % achievable
    # fraction; HBM3 3.35 TB/s at 80 %; a kernel launch ~4 us. NVLink 4: 900 GB/s bidirectional,
    # ~370 GB/s of ring bus bandwidth measured by nccl-tests for all-gather; ~15 us latency.
    "h100_nvlink": dict(flops_per_s=0.6 * 989e12, bytes_per_s=0.8 * 3.35e12, op_overhead_s=4e-6,
                        latency_s=15e-6, bandwidth=370e9),
    # The same GPUs across nodes: one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s, ~40 GB/s
    # achieved by a ring), ~30 us latency.
    "h100_infiniband": dict(flops_per_s=0.6 * 989e12, bytes_per_s=0.8 * 3.35e12, op_overhead_s=4e-6,
                            latency_s=30e-6, bandwidth=40e9),
}


@dataclass(frozen=True)
class CostModel:
    """Seconds of compute per graph node and of communication per collective."""

    flops_per_s: float
    bytes_per_s: float
    op_overhead_s: float
    latency_s: float
    bandwidth: float  # bytes per second through each rank's link
    source: str = "preset"  # "preset NAME" or "measured on ..."

    @classmethod
    def preset(cls, name: str) -> "CostModel":
        if name not in PRESETS:
            raise ValueError(f"unknown cost model preset {name!r}; the presets are {', '.join(PRESETS)}, "
                             "or measure the real group with CostModel.measure(group)")
        return cls(**PRESETS[name], source=f"preset {name}")

    @classmethod
    def for_device(cls, device: torch.device) -> "CostModel":
        """The preset for a device: H100 with NVLink for CUDA, gloo on CPU otherwise."""
        return cls.preset("h100_nvlink" if device.type == "cuda" else "cpu_gloo")

    # ---- communication -----------------------------------------------------------------------

    def collective_s(self, kind: str, nbytes: int, group_size: int) -> float:
        """One collective moving `nbytes` (the full tensor: gathered, or before reduction)."""
        if group_size <= 1:
            return self.latency_s
        ring = self.latency_s + nbytes * (group_size - 1) / group_size / self.bandwidth
        return 2 * ring if kind == "all_reduce" else ring

    # ---- compute -----------------------------------------------------------------------------

    def node_s(self, node: fx.Node) -> float:
        """One graph node's compute; 0 for views, collectives and graph plumbing."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return 0.0
        if node.target.namespace == "_c10d_functional" or node.target.is_view:
            return 0.0
        out = node.meta.get("val")
        nbytes = _nbytes(out) + sum(_nbytes(i.meta.get("val")) for i in node.all_input_nodes)
        flops = _flops(node)
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s) + self.op_overhead_s

    # ---- measurement -------------------------------------------------------------------------

    @classmethod
    def measure(cls, group=None, device: torch.device | str = "cpu", repeats: int = 5) -> "CostModel":
        """Constants measured on the real process group and device: an all-gather of two sizes
        gives latency and bandwidth, a matmul and a copy give compute. Every rank of `group`
        calls it and gets the same numbers (the slowest rank's), so that all plan alike."""
        import torch.distributed as dist

        device = torch.device(device)
        world = dist.get_world_size(group)

        def gather_s(numel: int) -> float:
            shard = torch.ones(numel // world, device=device)
            out = torch.empty(numel // world * world, device=device)
            dist.all_gather_into_tensor(out, shard, group=group)  # warm-up
            return _best_of(repeats, device, lambda: dist.all_gather_into_tensor(out, shard, group=group))

        small, large = 1 << 10, 1 << 22  # elements: 4 KiB and 16 MiB in fp32
        t_small, t_large = gather_s(small), gather_s(large)
        moved = 4 * (large - small) * (world - 1) / world
        bandwidth = moved / max(t_large - t_small, 1e-9)
        a = torch.randn(1024, 1024, device=device)
        t_mm = _best_of(repeats, device, lambda: a @ a)
        big = torch.empty(1 << 24, device=device)
        t_copy = _best_of(repeats, device, lambda: big.clone())
        values = torch.tensor([2 * 1024**3 / t_mm, 2 * big.nbytes / t_copy, t_small, bandwidth], device=device,
                              dtype=torch.float64)
        # The slowest rank's numbers, on every rank: lowest rates, highest latency.
        values[[0, 1, 3]] *= -1
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        values[[0, 1, 3]] *= -1
        flops, nbytes, latency, bandwidth = values.tolist()
        base = cls.for_device(device)
        return dataclasses.replace(base, flops_per_s=flops, bytes_per_s=nbytes, latency_s=latency,
                                   bandwidth=bandwidth, source=f"measured on {world} ranks ({device.type})")

    def describe(self) -> str:
        return (f"{self.source}: compute {self.flops_per_s / 1e12:.3g} TFLOP/s, {self.bytes_per_s / 1e9:.3g} GB/s; "
                f"network {self.latency_s * 1e6:.3g} us + {self.bandwidth / 1e9:.3g} GB/s")


def _nbytes(val) -> int:
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _flops(node: fx.Node) -> int:
    formula = flop_registry.get(node.target.overloadpacket)
    if formula is None:
        return _nbytes(node.meta.get("val")) // 4  # elementwise: about one op per output element
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        return int(formula(*args, out_val=node.meta.get("val"), **kwargs))
    except Exception:  # a formula that does not take this overload's arguments
        return 0


def _best_of(repeats: int, device: torch.device, fn) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best
