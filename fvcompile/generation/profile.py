"""Where a decode step's time goes, as arXiv 2410.00215 splits it: time in kernels per op class
(attention, FFN linears, other linears, everything else), launch overhead, host time, and on a GPU
the device's idle time.

One `torch.profiler` run over a few decode steps (after a warm-up), each event's self time put in
one class by the event and its callers: an op under an attention op is attention (the math
attention's matmuls and softmax, the flash kernel); an op under a matmul or linear is a linear,
an FFN linear when its weight has the shape of one of the model's `feed_forward` linears. Inductor's
fused CPU kernels show in the profile only with `cpp.enable_kernel_profile` (compiled steps for a
profile are built with it); a fused kernel counts as attention when attention is fused into it.

Devices. On a GPU, kernel time is device time (CUDA kernels, attributed to the op that launched
them), launch overhead is the host's time in the launch calls, and the device is idle for the rest
of the step: host work (Python, the framework, Dynamo's guards) and launches. On a CPU there is no
device: kernel time is the CPU time inside the ops (their dispatch included), and host time is the
rest of the step (Python, Dynamo's guards, Inductor's wrapper code); launch overhead does not
apply. The profiler slows every op it records a little: each profile also gives the step's time
measured without it.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

KERNEL_CLASSES = ("attention", "FFN linears", "other linears", "other kernels")
ATTENTION = re.compile(r"scaled_dot_product|attention|softmax", re.IGNORECASE)
LINEAR = re.compile(r"^aten::(linear|mm|addmm|bmm|matmul)$|_linear_pointwise|mkldnn_linear|^aten::_?int_mm")
# Events that are kernels (ops, Inductor's fused kernels); other events (Dynamo's cache lookup,
# the compiled region, Inductor's wrapper call) are host work.
KERNEL_EVENT = re.compile(r"^(aten|prims|mkldnn|quantized|fvcompile)::|cpp_fused|^triton_|^extern_kernels")
LAUNCH_CALLS = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx|cudaGraphLaunch"
                          r"|cudaLaunchCooperativeKernel)")


@dataclass
class DecodeProfile:
    """One variant's decode step, in seconds per step."""

    label: str  # e.g. "eager", "compiled"
    device_type: str
    steps: int
    step_s: float  # a step without the profiler
    profiled_step_s: float  # a step under the profiler: the breakdown below sums to it
    kernels_s: dict[str, float] = field(default_factory=dict)  # KERNEL_CLASSES -> time
    launch_s: float = 0.0  # GPU: host time in kernel launch calls
    host_s: float = 0.0  # the rest of the step's host time (on GPU: while the device idles)
    device_idle_s: float | None = None  # GPU: step time with no kernel running

    @property
    def kernel_total_s(self) -> float:
        return sum(self.kernels_s.values())

    def parts(self) -> dict[str, float]:
        """The parts that sum to the profiled step (for tables and plots)."""
        return {**self.kernels_s, "launch overhead": self.launch_s, "host": self.host_s}

    def to_dict(self) -> dict:
        return {**asdict(self), "kernel_total_s": self.kernel_total_s}


def linear_shapes(model: nn.Module) -> tuple[set, set]:
    """(FFN weight shapes, other linear weight shapes) as (out, in), from the model's modules."""
    ffn, other = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (ffn if "feed_forward" in name else other).add(tuple(module.weight.shape))
    return ffn, other - ffn


def _weight_shapes(event) -> set:
    """The (rows, cols) pairs of a matmul-like event's 2-D-or-more inputs, both ways round."""
    shapes = set()
    for shape in getattr(event, "input_shapes", None) or []:
        if isinstance(shape, (list, tuple)) and len(shape) >= 2 and all(isinstance(d, int) for d in shape):
            shapes.update({(shape[-2], shape[-1]), (shape[-1], shape[-2])})
    return shapes


def classify(event, ffn_shapes: set) -> str | None:
    """The event's class (KERNEL_CLASSES), or None for host work."""
    chain, e = [], event
    while e is not None:
        chain.append(e)
        e = e.cpu_parent
    if any(ATTENTION.search(e.name) for e in chain):
        return "attention"
    linears = [e for e in chain if LINEAR.search(e.name)]
    if linears:
        outermost = linears[-1]  # aten::linear's inputs carry the weight; its mm's a transposed view
        return "FFN linears" if _weight_shapes(outermost) & ffn_shapes else "other linears"
    return "other kernels" if KERNEL_EVENT.search(event.name) else None


def breakdown(events, ffn_shapes: set, device_type: str, wall_s: float, steps: int) -> dict:
    """The per-step parts of one profiled run (seconds)."""
    kernels = dict.fromkeys(KERNEL_CLASSES, 0.0)
    launch = 0.0
    for event in events:
        if LAUNCH_CALLS.search(event.name):
            launch += event.self_cpu_time_total * 1e-6
            continue
        kind = classify(event, ffn_shapes)
        if kind is None:
            continue
        spent = event.self_device_time_total if device_type == "cuda" else event.self_cpu_time_total
        kernels[kind] += spent * 1e-6
    per_step = {k: v / steps for k, v in kernels.items()}
    step = wall_s / steps
    if device_type == "cuda":
        idle = max(step - sum(per_step.values()), 0.0)
        launch_step = min(launch / steps, idle)
        return dict(kernels_s=per_step, launch_s=launch_step, host_s=idle - launch_step, device_idle_s=idle)
    return dict(kernels_s=per_step, launch_s=0.0, host_s=max(step - sum(per_step.values()), 0.0),
                device_idle_s=None)


def _run_decode(model, decode, cache, token, seq_start, first_slot: int, steps: int, sync) -> float:
    cache_pos = torch.tensor([first_slot], device=token.device)
    start = time.perf_counter()
    for _ in range(steps):
        token = decode(model, token, cache, cache_pos, seq_start).argmax(-1, keepdim=True)
        cache_pos += 1
    sync()
    return time.perf_counter() - start


def profile_decode(model: nn.Module, decode, cache, prompt_len: int, label: str, steps: int = 16,
                   warmup: int = 3) -> DecodeProfile:
    """Profile `steps` greedy decode steps of `decode` (a step function of generation/steps.py)
    after a prompt of `prompt_len` tokens (its slots are taken as filled: the timing of a step does
    not depend on what the cache holds)."""
    from torch.profiler import ProfilerActivity, profile

    device = cache.layers[0].k.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    batch = cache.batch_size
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    seq_start = torch.zeros(batch, dtype=torch.long, device=device)
    if prompt_len + warmup + 2 * steps > cache.length:
        raise ValueError(f"the cache has {cache.length} slots, the profile needs {prompt_len + warmup + 2 * steps}: "
                         "give a longer cache or fewer steps")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        _run_decode(model, decode, cache, token, seq_start, prompt_len, warmup, sync)
        plain = _run_decode(model, decode, cache, token, seq_start, prompt_len + warmup, steps, sync)
        with profile(activities=activities, record_shapes=True) as prof:
            profiled = _run_decode(model, decode, cache, token, seq_start, prompt_len + warmup + steps, steps, sync)
    ffn_shapes, _ = linear_shapes(model)
    parts = breakdown(prof.events(), ffn_shapes, device.type, profiled, steps)
    return DecodeProfile(label, device.type, steps, plain / steps, profiled / steps, **parts)


def _cell(p: DecodeProfile, name: str, unit: str = "") -> str:
    if name == "launch overhead" and p.device_type != "cuda":
        return "n/a (CPU)"
    return f"{p.parts()[name] * 1e3:.3f}{unit} ({p.parts()[name] / p.profiled_step_s:.0%})"


def table(profiles: list[DecodeProfile]):
    """A rich Table: one column per variant, ms per step and share of the profiled step."""
    from rich.table import Table

    t = Table(title="decode step: ms per step (share)")
    t.add_column("part")
    for p in profiles:
        t.add_column(p.label, justify="right")
    for name in profiles[0].parts():
        t.add_row(name, *(_cell(p, name) for p in profiles))
    if any(p.device_idle_s is not None for p in profiles):
        t.add_row("device idle", *("-" if p.device_idle_s is None else
                                   f"{p.device_idle_s * 1e3:.3f} ({p.device_idle_s / p.profiled_step_s:.0%})"
                                   for p in profiles))
    t.add_row("profiled step", *(f"{p.profiled_step_s * 1e3:.3f}" for p in profiles))
    t.add_row("step without profiler", *(f"{p.step_s * 1e3:.3f}" for p in profiles))
    return t


def markdown(profiles: list[DecodeProfile]) -> str:
    lines = ["| part | " + " | ".join(p.label for p in profiles) + " |",
             "|---|" + "---:|" * len(profiles)]
    for name in profiles[0].parts():
        lines.append(f"| {name} | " + " | ".join(_cell(p, name, " ms") for p in profiles) + " |")
    if any(p.device_idle_s is not None for p in profiles):
        lines.append("| device idle | " + " | ".join("-" if p.device_idle_s is None else
                                                    f"{p.device_idle_s * 1e3:.3f} ms" for p in profiles) + " |")
    lines.append("| profiled step | " + " | ".join(f"{p.profiled_step_s * 1e3:.3f} ms" for p in profiles) + " |")
    lines.append("| step without profiler | " + " | ".join(f"{p.step_s * 1e3:.3f} ms" for p in profiles) + " |")
    return "\n".join(lines)


def write_plot(profiles: list[DecodeProfile], path, title: str = "decode step") -> None:
    """Stacked horizontal bars, one per variant: each part of the profiled step in ms."""
    import matplotlib  # the `bench` extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in profiles[0].parts() if any(p.parts()[n] for p in profiles)]
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.5 * len(profiles)))
    left = [0.0] * len(profiles)
    for name in names:
        widths = [p.parts()[name] * 1e3 for p in profiles]
        ax.barh([p.label for p in profiles], widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("ms per decode step (under the profiler)")
    ax.set_title(title)
    ax.invert_yaxis()
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kernel_profile_options(device: torch.device) -> dict:
    """Inductor options that make a compiled step's kernels show in the profile."""
    return {"cpp.enable_kernel_profile": True} if device.type == "cpu" else {}


def profile_variants(model: nn.Module, prompt_len: int = 32, batch_size: int = 1, steps: int = 16,
                     passes="auto", compiled: bool = True) -> list[DecodeProfile]:
    """The decode step eager, compiled, and on CUDA compiled with CUDA graphs, on one cache
    (compiled=False: eager alone)."""
    from fvcompile.generate import compiled_steps, kv_cache_for
    from fvcompile.generation.checks import model_context
    from fvcompile.generation.steps import CompileSettings, decode_step

    device = model.tok_embeddings.weight.device
    needed = prompt_len + 3 + 2 * steps
    if needed > model_context(model):
        raise ValueError(f"a profile of {steps} steps after {prompt_len} tokens needs {needed} slots, more than "
                         f"the model's context of {model_context(model)}: give a shorter prompt_len or fewer steps")
    cache = kv_cache_for(model, batch_size, needed, None)
    options = tuple(kernel_profile_options(device).items())
    variants = {"eager": decode_step}
    if compiled:
        variants["compiled"] = compiled_steps(CompileSettings(passes=passes, options=options)).decode
    if compiled and device.type == "cuda":
        variants["compiled + CUDA graphs"] = compiled_steps(
            CompileSettings(passes=passes, mode="reduce-overhead", options=options)).decode
    return [profile_decode(model, decode, cache, prompt_len, label, steps) for label, decode in variants.items()]
