"""sparse24 speed and correctness: a Squared-ReLU FFN, dense vs 2:4, forward and forward+backward.

On a GPU (bf16) at Llama-3-8B FFN shapes: SwiGLU 4096 -> 14336 -> 4096 and its Squared-ReLU
equivalent 4096 -> 21504 -> 4096 (same parameters), 4k-16k tokens. Modes, all through Inductor:
SwiGLU dense, relu² dense, relu² with `passes=["sparse24"]`. The paper's bar is 1.3x on
forward+backward of the FFN. Also times our fused relu²+2:4+pack kernel against PyTorch's
`torch._sparse_semi_structured_tile` (on relu(h)², computed beforehand).

On CPU there are no 2:4 sparse tensor cores: the script checks correctness on small shapes and
reports what the emulation costs; speed needs an sm80+ GPU.

    python bench/sparse24.py                # CPU: small shapes
    python bench/sparse24.py --device cuda  # GPU: Llama-3-8B shapes, bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import fvcompile
from fvcompile.kernels import sparse24 as k24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.models.llama import SquaredReLU, SwiGLU
from fvcompile.passes.fp8_matmuls import DenseFP8
from fvcompile.passes.sparse24 import Sparse24


FP8_MODES = ("sparse24-fp8", "sparse24-fp8+dW2", "sparse24-fp8+dW1+dW2")
# Modes whose kernels a GPU run lists: which ops Inductor fused (e.g. dH with its FP8 row maxima,
# separate kernels on CPU) and where the time goes.
PROFILED = ("relu2 dense", "relu2 sparse24", "relu2 dense fp8", "relu2 sparse24-fp8+dW2", "relu2 sparse24-fp8+dW1+dW2")


def time_ms(fn, device: torch.device, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in ms (CUDA: synchronized; triton's do_bench where available)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def reference_ffn(x, w1, w2):
    """The defined reference of sparse24: relu(x W1ᵀ) with 2 of every 4 kept, squared, times W2ᵀ."""
    return k24.sparse24_relu_reference(x @ w1.t()).square() @ w2.t()


def check_against_reference(ffn: SquaredReLU, optimized, x, dtype, approximated: tuple = (), fp8=False) -> dict:
    """Forward and backward of the compiled sparse24 FFN vs the reference under autograd
    (`approximated`: gradients that the mode approximates on purpose, reported but not judged;
    fp8: all six matmuls quantize to e4m3, a few percent relative error each with its 3 mantissa
    bits, and a gradient passes through up to four of them; what the modes reach: bench/README.md)."""
    tol = 0.15 if fp8 else {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    ffn.zero_grad(set_to_none=True)
    torch.compiler.cudagraph_mark_step_begin()  # for the CUDA-graph modes; a no-op elsewhere
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1 = ffn.w1.weight.detach().clone().requires_grad_()
    w2 = ffn.w2.weight.detach().clone().requires_grad_()
    out = optimized(xa)
    ref = reference_ffn(xb.float(), w1.float(), w2.float())
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.float())

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

    errors = {"out": rel(out, ref), "dx": rel(xa.grad, xb.grad),
              "dw1": rel(ffn.w1.weight.grad, w1.grad), "dw2": rel(ffn.w2.weight.grad, w2.grad)}
    ffn.zero_grad(set_to_none=True)
    return {"relative_errors": errors, "tolerance": tol, "approximated": list(approximated),
            "ok": all(e < tol for name, e in errors.items() if name not in approximated)}


BASELINES = ("swiglu dense", "relu2 dense", "relu2 sparse24", "relu2 dense fp8")  # timed in every run


def bench_ffn(tokens: int, dim: int, hidden: int, dtype, device: torch.device, cuda_graphs: bool = False,
              progress=lambda row: None, only: tuple = ()) -> dict:
    """One row: every mode compiled, timed and checked at this token count. `progress(row)` gets
    the row as it fills (after each mode's first timing and each round), for a run cut short.
    only: the modes whose labels contain one of these (and the baselines); all where empty."""
    torch.manual_seed(0)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    skipped = {}  # label -> why the mode is not timed here
    # In the order their numbers matter, since a GPU's time is short and a run cut short keeps the
    # modes it reached: the FP8 modes (the paper's path) before the bf16 ones.
    modes = {
        "swiglu dense": (SwiGLU(dim, hidden), dict(passes=[])),
        "relu2 dense": (SquaredReLU(dim, hidden * 3 // 2), dict(passes=[])),
        "relu2 sparse24": (SquaredReLU(dim, hidden * 3 // 2), dict(passes=["sparse24"])),
        # The paper's path: the sparse matmuls in FP8 e4m3 (quantization on top of sparsity).
        "relu2 sparse24-fp8+dW2": (SquaredReLU(dim, hidden * 3 // 2),
                                   dict(passes=[Sparse24(fp8=True, sparse_weight_grad=True)])),
        "relu2 sparse24-fp8+dW1+dW2": (SquaredReLU(dim, hidden * 3 // 2),
                                       dict(passes=[Sparse24(fp8=True, sparse_weight_grad="all")])),
        "relu2 sparse24-fp8": (SquaredReLU(dim, hidden * 3 // 2), dict(passes=[Sparse24(fp8=True)])),
        # All six matmuls in FP8, dense (the fp8_dense pass): what FP8 alone gives, the baseline
        # of the FP8 sparse modes above.
        "relu2 dense fp8": (SquaredReLU(dim, hidden * 3 // 2), dict(passes=[DenseFP8()])),
        # The paper's variant: dW2 also sparse (A selected along tokens): 3 of the 6 matmuls.
        "relu2 sparse24+dW2": (SquaredReLU(dim, hidden * 3 // 2),
                               dict(passes=[Sparse24(sparse_weight_grad=True)])),
        # All four sparse-able matmuls sparse: dW1 too (tokens strided, the 5% densest features whole).
        "relu2 sparse24+dW1+dW2": (SquaredReLU(dim, hidden * 3 // 2),
                                   dict(passes=[Sparse24(sparse_weight_grad="all")])),
    }
    if only:  # a GPU's time is short: the modes asked for, and what they are held against
        modes = {label: m for label, m in modes.items() if label in BASELINES or any(o in label for o in only)}
    if device.type == "cuda" and not backends.fp8_sparse_mm_available(device):
        # Emulated FP8 at these shapes would time plain-PyTorch formulas, not the path, and take minutes.
        why = backends.no_sparse_mm_reason(device) or "its FP8 probe failed"
        for label in [m for m in modes if "sparse24-fp8" in m]:
            modes.pop(label)
            skipped[label] = f"skipped: no FP8 2:4 sparse matmul on this GPU ({why})"
    if cuda_graphs:  # CUDA graphs take the host's per-call cost (cuSPARSELt plans) out: every mode
        # kept also with graphs, beside its plain row (same process, same clocks).
        for label, mode in list(modes.items()):
            module, kwargs = copy.deepcopy(mode)
            modes[f"{label}, CUDA graphs"] = (module, {**kwargs, "mode": "reduce-overhead"})
    row = {"tokens": tokens, "dim": dim, "hidden_swiglu": hidden, "dtype": str(dtype),
           **{f"{label} error": why for label, why in skipped.items()}}
    # A fresh Dynamo cache per token count, with room for every mode's graphs: past its limit
    # Dynamo silently runs a module eagerly (a "sparse" row would time dense eager).
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(modes))
    steps = {}  # label -> (forward, forward_backward), compiled and warmed up
    times = {}  # (label, phase) -> ms per round

    def record():  # the medians so far, into the row
        for (label, phase), values in times.items():
            row[f"{label} {phase} ms"] = statistics.median(values)
            row[f"{label} {phase} ms, per round"] = values
        progress(row)

    checked = {}  # label -> (module, compiled) of the sparse modes, checked again after the timings
    for label, (module, kwargs) in modes.items():
        module = module.to(device=device, dtype=dtype)
        for p in module.parameters():
            nn.init.normal_(p, std=dim ** -0.5)
        compiled = fvcompile.optimize(module, dynamic=False, **kwargs)
        xg = x.clone().requires_grad_()

        # A CUDA-graph step reuses the previous step's output memory: say where a new step starts.
        new_step = torch.compiler.cudagraph_mark_step_begin if "CUDA graphs" in label else (lambda: None)

        def forward(compiled=compiled, new_step=new_step):
            new_step()
            with torch.no_grad():
                compiled(x)

        def forward_backward(compiled=compiled, module=module, xg=xg, new_step=new_step):
            new_step()
            module.zero_grad(set_to_none=True)
            # Not accumulated: under CUDA graphs the last step's x.grad is graph memory, since reused.
            xg.grad = None
            compiled(xg).backward(grad)

        try:
            for _ in range(3):  # compile, run the one-time sparse matmul algorithm searches (and record graphs)
                forward()
                forward_backward()
        except Exception as e:  # e.g. a mode that cannot capture CUDA graphs: record it, time the rest
            row[f"{label} error"] = f"{type(e).__name__}: {e}"[:300]
            continue
        steps[label] = (forward, forward_backward)
        # Round 0 right away, so that a run cut short (a GPU's time is short) keeps what it timed.
        times[label, "fwd"], times[label, "fwd+bwd"] = [time_ms(forward, device)], [time_ms(forward_backward, device)]
        record()
        if "sparse24" in label:
            checked[label] = (module, compiled)
        if label == "relu2 sparse24":
            row["sparse24 report"] = compiled.fvcompile_report.summary()
            row["sparse24 notes"] = sorted({n for r in compiled.fvcompile_report.pass_runs() for n in r.result.notes})
            # The same compiled graphs (same shapes: no recompile) against the reference.
            row["sparse24 check"] = check_against_reference(module, compiled, x, dtype)
    # Two more rounds over all modes, median per mode: clock and thermal drift hits every mode alike.
    for _ in range(2 if device.type == "cuda" else 0):
        for label, (forward, forward_backward) in steps.items():
            times[label, "fwd"].append(time_ms(forward, device))
            times[label, "fwd+bwd"].append(time_ms(forward_backward, device))
        record()
    if device.type == "cuda":
        for label in [m for m in PROFILED if m in steps]:
            try:  # the profile helps the next optimization; its failure must not cost the timings
                row[f"{label} profile"] = profile_table(steps[label][1])
            except Exception as e:
                row[f"{label} profile"] = f"profiler failed: {type(e).__name__}: {e}"
    # After the timings: had a sparse mode fallen back to eager, its numbers would now fail the check.
    for label, (module, compiled) in checked.items():
        row[f"{label} check after timing"] = check_against_reference(
            module, compiled, x, dtype, fp8="fp8" in label,
            approximated=(("dw2",) if "+dW2" in label else ()) + (("dw1",) if "+dW1" in label else ()))
    row["valid"] = row["sparse24 check"]["ok"] and all(
        row[f"{label} check after timing"]["ok"] for label in checked)
    for phase in ("fwd", "fwd+bwd"):
        row[f"speedup {phase} vs relu2 dense"] = row[f"relu2 dense {phase} ms"] / row[f"relu2 sparse24 {phase} ms"]
        row[f"speedup {phase} vs swiglu dense"] = row[f"swiglu dense {phase} ms"] / row[f"relu2 sparse24 {phase} ms"]
    modes_held = ("sparse24+dW2", "sparse24+dW1+dW2", *FP8_MODES, "dense fp8")
    for graphs in ("", ", CUDA graphs"):  # each mode against the baselines timed as it was
        pairs = [("relu2 dense", m) for m in modes_held] + [("relu2 dense fp8", m) for m in FP8_MODES]
        if graphs:
            pairs.insert(0, ("relu2 dense", "sparse24"))
        for base, label in pairs:  # a mode that failed to compile has an error instead of times
            if f"{base}{graphs} fwd+bwd ms" in row and f"relu2 {label}{graphs} fwd+bwd ms" in row:
                row[f"speedup fwd+bwd of {label}{graphs} vs {base}{graphs}"] = (
                    row[f"{base}{graphs} fwd+bwd ms"] / row[f"relu2 {label}{graphs} fwd+bwd ms"])
    return row


def profile_table(fn, rows: int = 30) -> str:
    """Where the time goes: the top CUDA kernels of a few calls of fn (for the next optimization)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)


def bench_pack(tokens: int, hidden: int, dtype, device: torch.device) -> dict:
    """Our fused relu²+2:4+pack kernels vs PyTorch's 2:4 tile (given relu(h)² precomputed), in both
    layouts: CUTLASS's (sm8x) and cuSPARSELt's (what Hopper runs). PyTorch's tile packs A and Aᵀ."""
    from fvcompile.kernels.sparse24_cslt import cslt_pack_triton

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    a = torch.relu(h).square()
    row = {"tokens": tokens, "hidden": hidden, "dtype": str(dtype),
           "fvcompile relu2_sparse24_pack (CUTLASS layout) ms":
               time_ms(lambda: torch.ops.fvcompile.relu2_sparse24_pack(h), device)}
    if device.type == "cuda":
        row["fvcompile cslt_pack_triton(relu, square) (cuSPARSELt layout) ms"] = time_ms(
            lambda: cslt_pack_triton(h, square=True, relu=True), device)
        for layout, use_cutlass in (("CUTLASS", True), ("cuSPARSELt", False)):
            key = f"torch _sparse_semi_structured_tile ({layout} layout) ms"
            try:
                row[key] = time_ms(lambda: torch._sparse_semi_structured_tile(a, "", use_cutlass), device)
            except Exception as e:  # not built for every arch / release
                row[key] = f"unavailable: {type(e).__name__}: {e}"[:200]
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts")
    parser.add_argument("--out", default=None, help="directory for the JSON results")
    parser.add_argument("--modes", default="", help="comma-separated parts of mode labels to time (with "
                        f"the baselines: {', '.join(BASELINES)}); all by default")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time every mode also with CUDA graphs (mode='reduce-overhead'); with --modes, a few")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        dtype, dim, hidden = torch.bfloat16, 4096, 14336
        tokens = [int(t) for t in (args.tokens or "4096,8192,16384").split(",")]
        name = torch.cuda.get_device_name(device)
        cores = backends.sparse_tensor_cores_available(device)
    else:
        dtype, dim, hidden = torch.float32, 256, 512
        tokens = [int(t) for t in (args.tokens or "1024").split(",")]
        name, cores = "cpu", False
    print(f"device: {name}; 2:4 sparse tensor cores: {cores}; torch {torch.__version__}")
    if not cores:
        print("no 2:4 sparse tensor cores: sparse24 runs emulated (masked dense), so this measures "
              "correctness and the emulation's cost; speed needs an sm80+ GPU")
    if backends.cslt_search_off:
        print(f"cuSPARSELt: {backends.cslt_search_off}")
    result = {"device": name, "sparse_tensor_cores": cores, "torch": torch.__version__,
              "cslt_search": backends.cslt_search_off or "on", "fp8_scales_in_matmul": backends.fp8_scales_in_matmul(device),
              "date": time.strftime("%Y-%m-%d"), "ffn": [], "pack": []}
    rows, pack_rows = result["ffn"], result["pack"]
    kind = f"{'gpu' if device.type == 'cuda' else 'cpu'}{'_cudagraphs' if args.cuda_graphs else ''}"
    out = Path(args.out) / f"sparse24_{kind}_{time.strftime('%Y-%m-%d')}_{'-'.join(map(str, tokens))}.json" \
        if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)

    def save(in_progress=None):  # a run cut short keeps what it measured
        if out:
            out.write_text(json.dumps({**result, **({"ffn in progress": in_progress} if in_progress else {})},
                                      indent=1, default=str))

    for t in tokens:
        rows.append(bench_ffn(t, dim, hidden, dtype, device, args.cuda_graphs, progress=save,
                              only=tuple(m for m in args.modes.split(",") if m)))
        save()
    if device.type == "cuda":
        pack_rows.append(bench_pack(tokens[0], hidden * 3 // 2, dtype, device))
    for r in rows:
        print(f"\ntokens {r['tokens']}, {r['dim']} -> {r['hidden_swiglu']} (SwiGLU) / "
              f"{r['hidden_swiglu'] * 3 // 2} (relu²), {r['dtype']}")
        for label in [k[: -len(" fwd ms")] for k in r if k.endswith(" fwd ms")]:
            print(f"  {label:40s} fwd {r[f'{label} fwd ms']:8.3f} ms   fwd+bwd {r[f'{label} fwd+bwd ms']:8.3f} ms")
        for key in [k for k in r if k.endswith(" error")]:
            print(f"  {key}: {r[key]}")
        if not r["valid"]:
            print("  INVALID: the sparse24 module failed its check against the reference (see below)")
        print(f"  sparse24 vs relu2 dense: fwd {r['speedup fwd vs relu2 dense']:.2f}x, "
              f"fwd+bwd {r['speedup fwd+bwd vs relu2 dense']:.2f}x (paper: 1.3x fwd+bwd)")
        for key in [k for k in r if k.startswith("speedup fwd+bwd of")]:
            print(f"  {key}: {r[key]:.2f}x")
        print(f"  check vs reference: {r['sparse24 check']}")
        print(f"  report: {r['sparse24 report']}; {r['sparse24 notes']}")
        for label in PROFILED:
            if f"{label} profile" in r:
                print(f"  profile of {label} fwd+bwd (3 calls):\n{r[f'{label} profile']}")
    for r in pack_rows:
        print(f"\npack {r}")
    if out:
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
