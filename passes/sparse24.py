"""sparse24: 2:4 activation sparsity for Squared-ReLU FFNs (after arXiv 2503.16672).

A Squared-ReLU FFN computes `Y = relu(X W1ᵀ)² W2ᵀ`. Its activations are mostly zero, so keeping
the 2 largest of every 4 along the hidden dimension loses almost nothing, and the second matmul
can then run on 2:4 sparse tensor cores. This pass finds the pattern in the joint forward+backward
graph (Inductor's `joint_custom_pre_pass`) and rewrites it. It changes numerics: it runs only when
named (`passes=["sparse24"]` or `passes=[Sparse24(...)]`).

What it matches, as AOTAutograd leaves it (`F.relu(x) ** 2`, `torch.square(F.relu(x))`,
`x.relu().pow(2)`, `nn.ReLU` then `.square()` all become `pow.Tensor_Scalar(relu, 2)`; `r * r`
becomes `mul.Tensor(r, r)`):

    h ─ relu ─[casts, views]─ pow(·, 2) | mul(r, r) ─[casts, views]─ mm(·, W2ᵀ) | addmm(b, ·, W2ᵀ)

Casts (autocast puts `pow` in fp32) and views that keep the elements in order (3-D tokens
flattened for the matmul; an in-place `F.relu(h, inplace=True)` or `nn.ReLU(inplace=True)`, which
functionalization turns into relu and views back; einsum's unsqueezes and permutes of size-1 dims)
may sit in between, as long as the matmul reduces over the hidden dim. A linear written as an einsum
(`torch.einsum("btf,df->btd", a, w)`) reaches the graph as a bmm of batch 1: the pass sees those as
mms while it matches (passes/bmm_as_mm.py) and puts back every one it did not rewrite; their weight
gradients come as Aᵀ·dY, not dYᵀ·A, and are rewritten as well. Dropout between relu² and the
matmul (T5's and Primer's FFN) keeps the site: it only zeros more entries, so its output is still
2:4 and the matmul reads it as it is; a factor computed from the model's activations (a relu²-GLU's
gate) does not, and the site is skipped with the reason. Other spellings of the same
function match too: `torch.clamp(h, min=0)` (`clamp_min(h, 0)`, whose gradient reads h, not r: the
square's `2r` factor still zeroes the dropped entries) and `torch.relu(h) * torch.relu(h)` (two relu
nodes of one input, merged into one; dH is then the sum of their two gradients). Every use of the
relu and of its square in the forward must be part of the pattern; uses that only compute gradients
are fine. A square of anything else (RMSNorm's `x²`) and a relu that is not squared are reported as
skipped with the reason; GELU/SiLU/SwiGLU FFNs have neither and are left alone.

Why the relu node is what gets replaced. The rewrite is `relu(h) -> fvcompile.sparse24_relu(h)`
(relu, then keep the 2 largest of every 4 along the hidden dim). Squaring is monotone on relu's
output, so the 2 largest of relu(h)² are the 2 largest of relu(h): squaring the sparse relu gives
exactly the 2:4-sparse relu². And because the joint graph's backward is written in terms of the
relu node's output r (the square's gradient `2 * r * grad` and relu's gradient
`where(le(r, 0), 0, ·)`), those formulas, now reading the sparse r, are exactly the gradient of the
sparse function (the mask is piecewise constant): forward and backward change together and stay
consistent, with no custom autograd in the graph.

The four backward matmuls of the FFN, with H = X W1ᵀ, A = mask ⊙ relu(H)² (the 2:4 activation),
Y = A W2ᵀ, dA = dY W2 and dH = 2 · relu_s(H) ⊙ dA (zero wherever the sparse relu is zero):

| matmul                 | what it is                          | here                                   |
|------------------------|-------------------------------------|----------------------------------------|
| dA = dY · W2           | input gradient of the 2nd linear    | dense                                   |
| dW2 = dYᵀ · A          | weight gradient of the 2nd linear   | dense, with the masked A (default); or |
|                        |                                     | sparse: A 2:4 along tokens (option)    |
| dX = dH · W1           | input gradient of the 1st linear    | sparse: dH is 2:4 along the hidden dim |
| dW1 = dHᵀ · X          | weight gradient of the 1st linear   | dense; or sparse: dH 2:4 along tokens, |
|                        |                                     | its 5% densest features whole ("all")  |

dH inherits the forward mask, and the hidden dim is dX's reduction dim, so dX is a 2:4 sparse
matmul with no further approximation. dW2 reduces over tokens: the forward's per-row mask gives
no 2:4 structure along that dim. By default dW2 stays dense with the masked A, which makes every
gradient here the exact gradient of the sparse forward (the reference the tests check against),
at the price of that matmul's speedup. `Sparse24(sparse_weight_grad=True)` follows the paper
instead: a second 2:4 selection of A along the tokens (the 2 largest of every 4 tokens, per
hidden unit) makes dW2 = dYᵀ · S_tokens(A) a sparse matmul too, an approximation of that one
gradient (its reference: the same formula in plain PyTorch). The tokens are grouped strided, t with
t + T/4, t + T/2 and t + 3T/4, T padded with zero tokens to a multiple of 64 (`sparse24_mm(strided_k=True)`;
the pack kernel reads them in place, so any token count runs sparse),
not as neighbours: neighbouring tokens are alike, and dropping 2 of 4 alike tokens loses more. In
the CPU study that took the sparse dW2 from +0.67% to -0.13% held-out loss
(bench/results/sparse24_backward_study_cpu_2026-11-27.json), as the paper's token permutation does.
Without it, at most 2 of the FFN's 6 matmuls are sparse, so fwd+bwd cannot reach the paper's 1.3x
even with perfect kernels (at 2x per sparse matmul: 6 / 5 = 1.2x); with it, 3 of 6 (6 / 4.5 =
1.33x). On an H100 or H200 in bf16
the 2:4 matmul is ~1.5x faster than the dense one, not 2x: the bounds are 1.07x-1.08x and 1.12x
(bench/README.md). A token-wise sparse dW1 as well cost 10.7% training loss with neighbouring
tokens grouped, and 2.1% strided (1.5%-1.7% with the 5% densest features left dense;
bench/diag/sparse24_backward_study.py): `Sparse24(sparse_weight_grad="all")` builds that last one, so
that all four sparse-able matmuls are sparse (`sparse24_mm(dense_rows=0.05)` multiplies the densest
features whole, a small dense matmul after the sparse one).

Devices. On a GPU where a one-time probe of the 2:4 sparse matmul succeeds
(`fvcompile.kernels.sparse24_backends.sparse_tensor_cores_available`) and the activation is fp16/bf16, the
forward matmul consuming A and the backward matmul consuming dH become `fvcompile.sparse24_mm`.
The forward one reads r and squares as it packs (A = r² is never written for it); in an inference
graph it reads h itself and the sparse relu disappears: relu, 2:4 selection, square and packing
are one memory pass before the sparse matmul.
Elsewhere (CPU, older GPUs, fp32) the pass runs the emulated path: only the relu is replaced and
the matmuls stay dense on the masked tensors (the same numbers, no speedup), and the result's
notes say so; `Sparse24(emulate=False)` leaves such sites dense instead. `sparse_mm=True` forces
the `sparse24_mm` rewrite anywhere (it then emulates at run time): useful for inspecting and
testing the full rewrite on CPU. The hidden width must be a multiple of 64 (the sparse matmul's
alignment) on every device, so that the emulation never makes a site sparse that the GPU could
not; token counts are free (dynamic shapes work; the kernels pad rows).

FP8 (`fp8=True`), the paper's path: all six FFN matmuls in float8_e4m3fn. The 2:4 sparse ones
(forward, dX, and dW2/dW1 with `sparse_weight_grad`) scale the sparse operand per row and the
dense one per tensor, the product scaled back by both (in cuSPARSELt's epilogue where the probe
finds that right; `kernels/sparse24_fp8.py` defines the formula, which is also the reference and
the emulation). The row maxima behind those scales are not read again where the graph has them:
in training the selection (`sparse24_relu_max`) also returns r's row maxima (the forward matmul's
scales) and column maxima (the sparse dW2's), and dX's and the sparse dW1's are `amax`es over dH's
rows and columns in the graph, for Inductor to fuse where it can (the same numbers: a row's
maximum is always kept). The matmuls left dense (h = X W1ᵀ, dA = dY W2, and dW1 and dW2 where they
are not sparse) run FP8 with row-wise scales (`fp8_rowwise_mm`, passes/fp8_matmuls.py): first
measured on an H200, the FFN with only its sparse matmuls in FP8 ran 1.08x-1.10x against bf16
dense while the dense FFN with all six in FP8 ran 1.33x, so FP8 for the sparse matmuls alone
cannot win. Every other op keeps the model's dtype, and gradients pass straight through the
quantization. Quantization on top of sparsity is measured against both: the training study's loss,
and speed against the bf16 dense FFN and against the dense FFN with all six matmuls in FP8
(bench/fp8_dense.py, the same row-wise formula). The FP8 2:4 matmul needs Hopper (cuSPARSELt; a
probe checks it); elsewhere the rewritten matmuls emulate the FP8 numbers.

Dense warm-up (`warmup_steps=N`). The rewritten ops get a schedule: a key per site (this pass
object's token, the module path and the site's index in it), N, and whether the op counts a step.
In a training (joint) graph the site's `sparse24_relu` counts one step per forward call; the
site's `sparse24_mm`s (forward and backward) and its ops in inference graphs read the step count.
Step i runs dense while i < N (`fvcompile.kernels.sparse24._in_dense_warmup`). A "step" is a
forward call of the compiled training graph: with gradient accumulation, count micro-batches. The
counter lives in this Python process and is read by the ops at run time (they are opaque to
Inductor), so it does not survive a restart and cannot run under CUDA graphs (the pass says so
with an error: a replayed graph would never leave, or never enter, the warm-up). The token is
part of the uuid when N > 0, so a second `Sparse24(warmup_steps=N)` never reuses the first one's
compiled graph (and its counters) from Inductor's cache. Under activation checkpointing the counting
op is marked to be saved, not recomputed in the backward (which would count a step twice and could
recompute r sparse where the forward ran dense): with a warm-up, r stays in memory.
"""
from __future__ import annotations

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
from fvcompile.passes.sparse24_match import (KIND_FFN, Skip, is_relu, match_site, merge_twin_relus, other_square,
                                             squares_and_gradients)
from fvcompile.passes.sparse24_steps import SiteRewrite, steps_for


class Sparse24(GraphPass):
    name = "sparse24"
    hook = "joint"
    exact = False
    helpers = (bmm_as_mm, fp8_matmuls, graph_utils, sparse24_config, sparse24_match, sparse24_steps)

    def __init__(self, config: Sparse24Config | None = None, *, recipe: str | None = None, **options):
        """`Sparse24()`, `Sparse24(recipe="paper")` (sparse24_config.RECIPES), `Sparse24(config)`, or
        options by keyword over any of them: `Sparse24(recipe="paper", warmup_steps=100)`. The
        options are Sparse24Config's fields (passes/sparse24_config.py)."""
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
        config = self.config
        if config.warmup_steps and ctx.device.type == "cuda" and inductor_config.triton.cudagraphs:
            # A replayed graph skips the ops' host code, where the warm-up counts its steps.
            raise ValueError(
                f"Sparse24(warmup_steps={config.warmup_steps}) cannot run under CUDA graphs "
                "(mode='reduce-overhead'): the warm-up counts steps on the host, which a graph replay "
                "skips. Compile without CUDA graphs for the warm-up's steps, or use warmup_steps=0.")
        graph = gm.graph
        result = PassResult()
        merge_twin_relus(graph, gradient_only_nodes(graph))
        # einsum's batch-1 bmms of relu² and dH as the mms they are, put back where not rewritten.
        einsum_mms = bmm_as_mm.as_mm(graph, squares_and_gradients(graph))
        grad = gradient_only_nodes(graph)
        has_cores = backends.sparse_tensor_cores_available(ctx.device)
        has_fp8 = config.fp8 and backends.fp8_sparse_mm_available(ctx.device)
        cslt = has_cores and backends.sparse_mm_backend(ctx.device) == "cusparselt"  # host cost per call (below)
        training = ctx.graph_kind == "joint"
        sites_per_module: dict[str, int] = {}
        emulated = 0

        for relu in [n for n in graph.nodes if is_relu(n) and n not in grad]:  # a relu of gradients is no activation
            module = module_path(relu)
            found = match_site(relu, grad)
            if found is None:
                continue
            if isinstance(found, Skip):
                result.skipped.append(Site(relu.name, module, found.detail, kind=found.kind, reason=found.reason))
                continue
            if not ctx.module_allowed(module):
                result.skipped.append(Site(relu.name, module, "excluded by module filter", kind=KIND_FFN,
                                           reason="excluded"))
                continue
            dtype = found.matmuls[0].meta["val"].dtype  # what the matmul would pack
            on_cores = has_cores and dtype in k24.PACK_DTYPES and (not config.fp8 or has_fp8)
            if not on_cores and not config.emulate:
                why = (backends.no_sparse_mm_reason(ctx.device) if not has_cores
                       else f"{dtype} has no 2:4 sparse matmul (needs fp16/bf16)" if dtype not in k24.PACK_DTYPES
                       else f"no FP8 2:4 sparse matmul on {ctx.device}")
                result.skipped.append(Site(relu.name, module, f"{why} and emulate=False: left dense", kind=KIND_FFN,
                                           reason="no_sparse_mm"))
                continue
            emulated += not on_cores

            index = sites_per_module.get(module, 0)
            sites_per_module[module] = index + 1
            use_mm = config.sparse_mm or (config.sparse_mm is None and (on_cores or config.fp8))
            rewrite = SiteRewrite(graph, found, training, config.fp8, with_maxima=training and config.fp8 and use_mm)
            if self.schedule is not None:
                rewrite.schedule = self.schedule.key(f"{module or relu.name}#{index}")
            before = op_counts(graph)
            detail = "; ".join(phrase for step in steps_for(config, training, use_mm) for phrase in step(rewrite))
            detail += self._device_detail(ctx.device, on_cores)
            result.rewritten.append(Site(relu.name, module, detail, kind=KIND_FFN,
                                         ops=op_delta(before, op_counts(graph))))

        result.skipped += [Site(node.name, module_path(node), skip.detail, kind=skip.kind, reason=skip.reason)
                           for node in graph.nodes if (skip := other_square(node, grad))]
        bmm_as_mm.as_bmm(graph, einsum_mms)
        if emulated:
            where = (backends.no_sparse_mm_reason(ctx.device) if not has_cores
                     else f"no FP8 2:4 sparse matmul on {ctx.device}" if config.fp8 and not has_fp8
                     else "the activations are not fp16/bf16")
            result.notes.append(f"emulated: {where}; {emulated} site(s) run the 2:4 masked-dense "
                                "path (same numerics as the sparse matmul, no speedup)")
        if cslt and len(result.rewritten) > emulated and not inductor_config.triton.cudagraphs:  # sites on cores
            result.notes.append(
                "host cost: torch._cslt_sparse_mm sets up its cuSPARSELt plan on every call (~0.4 ms of host "
                "time each, ~0.9 ms with FP8's scaling; H200): at a few thousand tokens the FFN waits on the "
                "host; mode='reduce-overhead' (CUDA graphs) takes that out")
        if config.warmup_steps and result.rewritten:
            result.notes.append(f"dense warm-up: the first {config.warmup_steps} training steps run dense")
        return result

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
