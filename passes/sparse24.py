"""sparse24: 2:4 activation sparsity for Squared-ReLU FFNs (after arXiv 2503.16672).

A Squared-ReLU FFN computes `Y = relu(X W1ᵀ)² W2ᵀ`. Its activations are mostly zero, so keeping
the 2 largest of every 4 along the hidden dimension loses almost nothing, and the second matmul
can then run on 2:4 sparse tensor cores. This pass finds the FFNs in the joint forward+backward
graph (Inductor's `joint_custom_pre_pass`) and rewrites them. It changes numerics: it runs only
when named (`passes=["sparse24"]` or `passes=[Sparse24(...)]`).

The pass is a pipeline over three modules:
- matching (passes/sparse24_match.py): one `FfnSite` record per FFN, however it is spelled
  (`F.relu(x) ** 2`, `torch.square`, `r * r`, an in-place relu, `clamp(min=0)`, autocast's casts,
  linears written as einsum, dropout before the second linear), or a `Skip` with its reason
  (a relu not squared, a square of something else, a hidden width off the alignment, ...);
- the rewrite steps (passes/sparse24_steps.py), each over that record: the sparse relu, the
  sparse weight gradients, the sparse forward matmul and dX, the dense matmuls in FP8;
- the options (passes/sparse24_config.py): one frozen `Sparse24Config`, or a named recipe.

The FFN's matmuls, with H = X W1ᵀ, A = mask ⊙ relu(H)² (the 2:4 activation), Y = A W2ᵀ,
dA = dY W2 and dH = 2 · relu_s(H) ⊙ dA (zero wherever the sparse relu is zero):

| matmul         | what it is                         | here                                            |
|----------------|------------------------------------|-------------------------------------------------|
| Y = A · W2ᵀ    | the second linear                  | sparse: A is 2:4 along the hidden dim           |
| dA = dY · W2   | input gradient of the 2nd linear   | dense                                           |
| dW2 = dYᵀ · A  | weight gradient of the 2nd linear  | dense with the masked A; or sparse ("dW2"):     |
|                |                                    | A 2:4 along tokens, grouped strided             |
| dX = dH · W1   | input gradient of the 1st linear   | sparse: dH is 2:4 along the hidden dim          |
| dW1 = dHᵀ · X  | weight gradient of the 1st linear  | dense; or sparse ("all"): dH 2:4 along tokens,  |
|                |                                    | its densest features whole                      |

dH inherits the forward mask, and the hidden dim is dX's reduction dim, so dX is a 2:4 sparse
matmul with no further approximation. The weight gradients reduce over tokens, where the forward's
per-row mask gives no 2:4 structure: by default they stay dense with the masked A, which makes
every gradient the exact gradient of the sparse forward. `sparse_weight_grad="dW2"` follows the
paper instead: a second 2:4 selection of A along the tokens (grouped strided, t with t + T/4,
t + T/2 and t + 3T/4, not as neighbours: neighbouring tokens are alike, and dropping 2 of 4 alike
tokens loses more) makes dW2 a sparse matmul too, an approximation of that one gradient. Without
it, at most 2 of the FFN's 6 matmuls are sparse, which bounds what fwd+bwd can gain;
`sparse_weight_grad="all"` makes dW1 sparse the same way, so that all four sparse-able matmuls
are. bench/README.md has what each costs in training loss and gains in time.

Devices. On a GPU where a one-time probe of the 2:4 sparse matmul succeeds
(`fvcompile.kernels.sparse24_backends.sparse_tensor_cores_available`) and the activation is
fp16/bf16, the sparse matmuls become `fvcompile.sparse24_mm` (forward, dX) and
`fvcompile.sparse24_weight_grad_mm` (dW2, dW1). Elsewhere (CPU, older GPUs, fp32) the pass runs the
emulated path: only the relu is replaced and the matmuls stay dense on the masked tensors (the
same numbers, no speedup), and the result's notes say so; `emulate=False` leaves such sites dense
instead, and `sparse_mm=True` forces the matmul rewrite anywhere (emulated at run time). The
hidden width must be a multiple of 64 (the sparse matmul's alignment) on every device, so that
the emulation never makes a site sparse that the GPU could not; token counts are free.

FP8 (`fp8=True`), the paper's path: all six FFN matmuls in float8_e4m3fn. The 2:4 ones scale the
sparse operand per row and the dense one per tensor (kernels/sparse24_fp8.py defines the formula,
which is also the reference and the emulation); the row maxima behind those scales come from the
graph where it has them (the selection's own pass, or `amax`es over dH for Inductor to fuse). The
matmuls left dense run FP8 with row-wise scales (passes/fp8_matmuls.py, the `fp8_dense` pass's
rewrite): FP8 for the sparse matmuls alone cannot beat a dense FFN all in FP8, which is the
baseline quantization on top of sparsity is held against. Gradients pass straight through the
quantization. The FP8 2:4 matmul needs Hopper (cuSPARSELt; a probe checks it); elsewhere the
rewritten matmuls emulate the FP8 numbers.

Dense warm-up (`warmup_steps=N`). The pass object owns a `WarmupSchedule`
(kernels/sparse24_schedule.py) with a step counter per site; the rewritten ops carry the site's
key. In a training graph the site's sparse relu counts one step per forward call; its matmuls
(forward and backward) and its ops in inference graphs read the count. Step i runs dense while
i < N. A "step" is a forward call of the compiled training graph: with gradient accumulation,
count micro-batches. The counters live in this process and are read by the ops at run time (they
are opaque to Inductor), so they do not survive a restart and cannot run under CUDA graphs (the
pass says so with an error: a replayed graph would never leave, or never enter, the warm-up).
Under activation checkpointing the counting op is marked to be saved, not recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._inductor import config as inductor_config

from fvcompile.kernels import sparse24 as k24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels.sparse24_schedule import WarmupSchedule
from fvcompile.passes import bmm_as_mm, fp8_matmuls, graph_utils, sparse24_config, sparse24_match, sparse24_steps
from fvcompile.passes.base import GraphPass, PassContext, PassResult, Site
from fvcompile.passes.graph_utils import gradient_only_nodes, module_path, op_counts, op_delta
from fvcompile.passes.sparse24_config import RECIPES, Sparse24Config  # noqa: F401 - the pass's vocabulary
from fvcompile.passes.sparse24_match import (KIND_FFN, FfnSite, Skip, is_relu, match_site, merge_twin_relus,
                                             other_square, squares_and_gradients)
from fvcompile.passes.sparse24_steps import SiteRewrite, steps_for


@dataclass(frozen=True)
class DeviceSupport:
    """What a device runs of sparse24's matmuls (each a one-time probe, cached)."""

    has_cores: bool  # 2:4 sparse tensor cores
    has_fp8: bool  # an FP8 2:4 matmul (asked only when the pass runs FP8)
    cslt: bool  # cuSPARSELt is the backend (its plan costs host time per call)

    @staticmethod
    def of(device: torch.device, fp8: bool) -> DeviceSupport:
        has_cores = backends.sparse_tensor_cores_available(device)
        return DeviceSupport(has_cores, fp8 and backends.fp8_sparse_mm_available(device),
                             has_cores and backends.sparse_mm_backend(device) == "cusparselt")


class Sparse24(GraphPass):
    name = "sparse24"
    hook = "joint"
    exact = False
    helpers = (bmm_as_mm, fp8_matmuls, graph_utils, sparse24_config, sparse24_match, sparse24_steps)

    def __init__(self, config: Sparse24Config | None = None, *, recipe: str | None = None, **options):
        """`Sparse24()`, `Sparse24(recipe="paper")` (sparse24_config.RECIPES), `Sparse24(config)`, or
        options by keyword over any of them: `Sparse24(recipe="paper", warmup_steps=100)`. The
        options are Sparse24Config's fields (passes/sparse24_config.py)."""
        if config is not None and not isinstance(config, Sparse24Config):
            raise TypeError(f"Sparse24 takes a Sparse24Config, a recipe= or options by keyword, got {config!r}")
        if config is not None and recipe is not None:
            raise ValueError("Sparse24 takes a config or a recipe, not both")
        base = config if config is not None else sparse24_config.recipe(recipe) if recipe else Sparse24Config()
        self.config = base.replace(**options) if options else base
        # The warm-up's step counters belong to this pass object (kernels/sparse24_schedule.py).
        self.schedule = WarmupSchedule(self.config.warmup_steps) if self.config.warmup_steps else None

    def options(self) -> dict[str, Any]:
        opts = self.config.options()
        if self.schedule is not None:
            # A second Sparse24(warmup_steps=N) must not reuse the first one's compiled graph (and
            # with it the first one's counters) from Inductor's cache: the token is in the uuid.
            opts["schedule_token"] = self.schedule.token
        return opts

    def pays_off_on(self, device: torch.device) -> bool:
        return backends.sparse_tensor_cores_available(device)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self._refuse_cuda_graphs(ctx)
        graph = gm.graph
        result = PassResult()
        merge_twin_relus(graph, gradient_only_nodes(graph))
        # einsum's batch-1 bmms of relu² and dH as the mms they are, put back where not rewritten.
        einsum_mms = bmm_as_mm.as_mm(graph, squares_and_gradients(graph))
        grad = gradient_only_nodes(graph)
        device = DeviceSupport.of(ctx.device, self.config.fp8)
        sites_per_module: dict[str, int] = {}
        emulated = 0
        for relu in [n for n in graph.nodes if is_relu(n) and n not in grad]:  # a relu of gradients is no activation
            found = match_site(relu, grad)
            if found is None:
                continue
            site, on_cores = self._visit(graph, relu, found, ctx, device, sites_per_module)
            if site.reason:  # skipped
                result.skipped.append(site)
            else:
                result.rewritten.append(site)
                emulated += not on_cores
        result.skipped += [Site(node.name, module_path(node), skip.detail, kind=skip.kind, reason=skip.reason)
                           for node in graph.nodes if (skip := other_square(node, grad))]
        bmm_as_mm.as_bmm(graph, einsum_mms)
        result.notes += self._notes(ctx.device, device, len(result.rewritten), emulated)
        return result

    def _refuse_cuda_graphs(self, ctx: PassContext) -> None:
        if self.config.warmup_steps and ctx.device.type == "cuda" and inductor_config.triton.cudagraphs:
            # A replayed graph skips the ops' host code, where the warm-up counts its steps.
            raise ValueError(
                f"Sparse24(warmup_steps={self.config.warmup_steps}) cannot run under CUDA graphs "
                "(mode='reduce-overhead'): the warm-up counts steps on the host, which a graph replay "
                "skips. Compile without CUDA graphs for the warm-up's steps, or use warmup_steps=0.")

    def _visit(self, graph: fx.Graph, relu: fx.Node, found: FfnSite | Skip, ctx: PassContext,
               device: DeviceSupport, sites_per_module: dict[str, int]) -> tuple[Site, bool]:
        """One matched relu: the site it is, rewritten or skipped with the reason, and whether it
        runs on sparse tensor cores."""
        config, module = self.config, module_path(relu)
        if isinstance(found, Skip):
            return Site(relu.name, module, found.detail, kind=found.kind, reason=found.reason), False
        if not ctx.module_allowed(module):
            return Site(relu.name, module, "excluded by module filter", kind=KIND_FFN, reason="excluded"), False
        dtype = found.matmuls[0].meta["val"].dtype  # what the matmul would pack
        on_cores = device.has_cores and dtype in k24.PACK_DTYPES and (not config.fp8 or device.has_fp8)
        if not on_cores and not config.emulate:
            why = (backends.no_sparse_mm_reason(ctx.device) if not device.has_cores
                   else f"{dtype} has no 2:4 sparse matmul (needs fp16/bf16)" if dtype not in k24.PACK_DTYPES
                   else f"no FP8 2:4 sparse matmul on {ctx.device}")
            return Site(relu.name, module, f"{why} and emulate=False: left dense", kind=KIND_FFN,
                        reason="no_sparse_mm"), False
        index = sites_per_module.get(module, 0)
        sites_per_module[module] = index + 1
        training = ctx.graph_kind == "joint"
        use_mm = config.sparse_mm or (config.sparse_mm is None and (on_cores or config.fp8))
        rewrite = SiteRewrite(graph, found, training, config.fp8, with_maxima=training and config.fp8 and use_mm)
        if self.schedule is not None:
            rewrite.schedule = self.schedule.key(f"{module or relu.name}#{index}")
        before = op_counts(graph)
        detail = "; ".join(phrase for step in steps_for(config, training, use_mm) for phrase in step(rewrite))
        detail += self._device_detail(ctx.device, on_cores)
        return Site(relu.name, module, detail, kind=KIND_FFN, ops=op_delta(before, op_counts(graph))), on_cores

    def _notes(self, where: torch.device, device: DeviceSupport, rewritten: int, emulated: int) -> list[str]:
        """The pass-wide remarks: the emulated sites and why, the host's cost, the warm-up."""
        notes = []
        if emulated:
            why = (backends.no_sparse_mm_reason(where) if not device.has_cores
                   else f"no FP8 2:4 sparse matmul on {where}" if self.config.fp8 and not device.has_fp8
                   else "the activations are not fp16/bf16")
            notes.append(f"emulated: {why}; {emulated} site(s) run the 2:4 masked-dense "
                         "path (same numerics as the sparse matmul, no speedup)")
        if device.cslt and rewritten > emulated and not inductor_config.triton.cudagraphs:  # sites on cores
            notes.append(
                "host cost: torch._cslt_sparse_mm sets up its cuSPARSELt plan on every call, in host time: "
                "at a few thousand tokens the FFN waits on the host; mode='reduce-overhead' (CUDA graphs) "
                "takes that out")
        if self.config.warmup_steps and rewritten:
            notes.append(f"dense warm-up: the first {self.config.warmup_steps} training steps run dense")
        return notes

    def _device_detail(self, device: torch.device, on_cores: bool) -> str:
        """What the report adds to a rewritten site's detail about FP8 and the device."""
        detail = ""
        if self.config.fp8:
            detail += "; the 2:4 matmuls in FP8 e4m3 (the sparse operand scaled per row, the dense one per tensor)"
            if on_cores:
                detail += (", the scales applied in cuSPARSELt's epilogue" if backends.fp8_scales_in_matmul(device)
                           else ", the scales applied by a pass after the matmul (cuSPARSELt's epilogue "
                                "failed its probe here)")
        if not on_cores:
            detail += f" (emulated on {device.type}: dense matmuls of the masked tensors)"
        return detail
