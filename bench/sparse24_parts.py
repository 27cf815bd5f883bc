"""Where a 2:4 FFN's time goes on a GPU: each piece of the sparse path timed alone.

A 2:4 FFN is only as fast as the pieces its step is built from (the first GPU runs found one,
cuSPARSELt's own compress, slower than the sparse matmul it feeds: bench/README.md).
This times, at one Llama-3-8B shape (tokens x 21504 hidden x 4096), every piece the sparse path
could be built from, next to the dense matmul each one must beat, so that one GPU call shows
what to fix:

- memory-bound pieces (ms and GB/s): relu² in eager PyTorch, our 2:4 selection kernel at several
  tile shapes (also reading a transposed view, as the weight gradient's selection does),
  cuSPARSELt's compress, PyTorch's fused 2:4 tile (xFormers' kernel), our CUTLASS-layout pack;
- matmuls (ms and TFLOP/s): each of the FFN's four matmuls that can be sparse, dense (cuBLAS)
  and as a cuSPARSELt 2:4 matmul (default and searched algorithm, B transposed or contiguous);
- the op as the pass calls it, and the forward's second half end to end.

A failure is recorded, not raised.

    python bench/sparse24_parts.py --tokens 8192
    python bench/sparse24_parts.py --ceilings-of bench/results/gpu_check_h100_2026-11-26T1651.json
"""
from __future__ import annotations

import argparse
import json

import torch

from fvcompile.kernels import sparse24 as k24
from fvcompile.kernels import sparse24_backends as backends
from fvcompile.kernels import sparse24_cslt as cslt
from fvcompile.kernels import sparse24_cutlass as cutlass
from fvcompile.kernels import sparse24_weight_grad_mm as wgrad24


def parts(tokens: int = 8192, hidden: int = 21504, dim: int = 4096, dtype=torch.bfloat16,
          device: str = "cuda") -> list[dict]:
    """device="cpu" is a dry run of this script (Triton interpreter, small shapes, CUDA parts fail)."""
    from sparse24 import time_ms  # bench/sparse24.py

    def ms(fn):
        return time_ms(fn, torch.device(device))

    torch.manual_seed(0)
    m, k, n = tokens, hidden, dim
    h = torch.randn(m, k, device=device, dtype=dtype)  # the first linear's output
    r = k24.sparse24_relu_triton(h)
    a = r.square()  # the 2:4 activation A (tokens x hidden)
    w2 = torch.randn(n, k, device=device, dtype=dtype)  # second linear: Y = A W2ᵀ
    w1 = torch.randn(k, n, device=device, dtype=dtype)  # first linear's weight: dX = dH W1
    x = torch.randn(m, n, device=device, dtype=dtype)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    dh = a * torch.randn_like(a)  # 2:4 like A (the backward's dH inherits the mask)
    elem = a.element_size()
    rows: list[dict] = []

    def record(name, make, bytes_moved=None, flops=None):
        try:
            t = ms(make())
            row = {"part": name, "ms": t}
            if bytes_moved:
                row["GB/s"] = bytes_moved / t / 1e6
            if flops:
                row["TFLOP/s"] = flops / t / 1e9
        except Exception as e:
            row = {"part": name, "ms": None, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)

    rw = 2 * m * k * elem  # read one activation, write one
    record("relu(h)^2 eager (2 kernels)", lambda: lambda: torch.relu(h).square(), 2 * rw)
    record("triton 2:4 relu select 16x256", lambda: lambda: k24.sparse24_relu_triton(h), rw)
    record("triton 2:4 relu select 16x256 + row and column maxima (tile maxima, reduced; FP8 training)",
           lambda: lambda: k24.sparse24_relu_max_triton(h), rw)
    record("Aᵀ.contiguous() (a plain transpose copy)", lambda: lambda: a.t().contiguous(), rw)
    record("torch._cslt_compress(A)", lambda: lambda: torch._cslt_compress(a), rw * 3 // 4)
    record("torch._sparse_semi_structured_tile(A) cuSPARSELt (2:4 both ways)",
           lambda: lambda: torch._sparse_semi_structured_tile(a, "", False), rw)
    # CUTLASS's metadata is column-major in pairs of int16 words, rows permuted in blocks of 32: a
    # tile of whole 32-row blocks writes it in 128-byte runs, a 16-row tile every other 8 bytes of them.
    for bm, bk in ((32, 128), (16, 256), (64, 64), (32, 256)):
        record(f"triton relu2+2:4+pack CUTLASS layout {bm}x{bk}",
               lambda bm=bm, bk=bk: lambda: cutlass.relu2_sparse24_pack_triton(h, block_m=bm, block_k=bk), rw)
    packed = rw * 3 // 4  # read one activation, write half of it plus metadata
    for bm, bk in ((32, 128), (16, 256), (64, 64), (32, 256), (64, 128)):
        record(f"triton 2:4 select+pack cuSPARSELt layout, A, {bm}x{bk}",
               lambda bm=bm, bk=bk: lambda: cslt.cslt_pack_triton(a, block_m=bm, block_k=bk), packed)
    record("triton 2:4 select+square+pack cuSPARSELt layout, r", lambda: lambda: cslt.cslt_pack_triton(r, True), packed)
    record("triton 2:4 select+pack cuSPARSELt layout, Aᵀ (transposed view)",
           lambda: lambda: cslt.cslt_pack_triton(a.t()), packed)
    record("triton 2:4 select+pack cuSPARSELt layout, Aᵀ (transposed view) 64x64",
           lambda: lambda: cslt.cslt_pack_triton(a.t(), block_m=64, block_k=64), packed)

    def cusparselt(sparse, b, search=False):
        compressed = torch._cslt_compress(sparse)
        plan = backends.cslt_plan(compressed, b, False) if search else {}  # what sparse24_mm runs with
        if search:
            rows.append({"part": f"  (searched cuSPARSELt plan: {plan})", "ms": None})
        return lambda: torch._cslt_sparse_mm(compressed, b, **plan)

    f = 2 * m * k * n
    record("fwd  Y = A W2ᵀ dense (cuBLAS, W2ᵀ a view)", lambda: lambda: torch.mm(a, w2.t()), flops=f)
    record("fwd  Y = A W2ᵀ cuSPARSELt, W2ᵀ view, searched", lambda: cusparselt(a, w2.t(), True), flops=f)
    w2t = w2.t().contiguous()
    record("fwd  Y = A W2ᵀ cuSPARSELt, W2ᵀ contiguous, searched", lambda: cusparselt(a, w2t, True), flops=f)
    record("bwd  dX = dH W1 dense", lambda: lambda: torch.mm(dh, w1), flops=f)
    record("bwd  dX = dH W1 cuSPARSELt, searched", lambda: cusparselt(dh, w1, True), flops=f)
    record("bwd  dW2 = dYᵀ A dense", lambda: lambda: torch.mm(dy.t(), a), flops=f)
    at24 = k24.sparse24_select_triton(a.t())
    record("bwd  dW2ᵀ = S(Aᵀ) dY cuSPARSELt, searched", lambda: cusparselt(at24, dy, True), flops=f)
    record("bwd  dW1 = dHᵀ X dense", lambda: lambda: torch.mm(dh.t(), x), flops=f)
    # FP8 (e4m3), where the paper's 1.3x comes from: is a 2:4 FP8 matmul faster than a dense one
    # by more than bf16's 2:4 matmul is? (Timings only: cuSPARSELt's own compress, outside the timing.)
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None and device == "cuda":
        a8, w8 = a.to(fp8), w2.to(fp8)  # w2 (n, k) row-major: w2ᵀ is the column-major B FP8 wants
        one = torch.ones((), device=device)
        record("fp8  Y = A W2ᵀ dense torch._scaled_mm", lambda: lambda: torch._scaled_mm(
            a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), flops=f)

        def fp8_sparse(search, alpha=None):
            compressed = torch._cslt_compress(a8)
            plan = backends.cslt_plan(compressed, w8.t(), False, torch.bfloat16, alpha) if search else {}
            return lambda: torch._cslt_sparse_mm(compressed, w8.t(), alpha=alpha, out_dtype=torch.bfloat16, **plan)

        from fvcompile.kernels import sparse24_fp8 as f8

        scale = f8.row_scale(a, False, False)
        record("fp8  triton 2:4 select+pack cuSPARSELt FP8 layout, A, row scale",
               lambda: lambda: cslt.cslt_pack_triton(a, out_dtype=fp8, scale=scale), m * k * elem + m * k * 5 // 8)
        record("fp8  triton 2:4 select+pack cuSPARSELt FP8 layout, A, no scale (no division)",
               lambda: lambda: cslt.cslt_pack_triton(a, out_dtype=fp8), m * k * elem + m * k * 5 // 8)
        # The sparse dW2's pack: rᵀ, a transposed view, K (tokens) strided, squared, scaled by r's
        # column maxima. Slower than the forward's pack (bench/README.md): which tile shape reads a
        # transposed view best?
        col_scale = f8.row_scale(r.t(), square=True, relu=False)  # rᵀ's rows: r's columns
        for bm, bk in ((16, 256), (64, 64), (128, 64), (32, 128)):
            record(f"fp8  pack rᵀ strided, squared (the sparse dW2's), {bm}x{bk}",
                   lambda bm=bm, bk=bk: lambda: cslt.cslt_pack_triton(r.t(), square=True, out_dtype=fp8, scale=col_scale,
                                                                      strided_k=True, block_m=bm, block_k=bk),
                   m * k * elem + m * k * 5 // 8)
        sw = f8.tensor_scale(w1)
        record("fp8  quantize W1 (K, N) column-major, eager PyTorch",
               lambda: lambda: f8.quantize(w1.t(), sw).contiguous().t(), w1.numel() * (elem + 1))
        record("fp8  quantize W1 (K, N) column-major, triton",
               lambda: lambda: f8.quantize_column_major_triton(w1, sw), w1.numel() * (elem + 1))
        record("fp8  row scales of A (amax per row)", lambda: lambda: f8.row_scale(a, False, False), m * k * elem)
        y, sa = torch.randn(m, n, device=device, dtype=dtype), scale[:m]
        record("fp8  quantize dY (T, D) in the strided token order: gather, then quantize (two passes)",
               lambda: lambda: f8.quantize_column_major_triton(cslt.to_strided_k(y, 0), sw), m * n * (3 * elem + 1))
        record("fp8  quantize dY (T, D) in the strided token order, read in place (one pass)",
               lambda: lambda: f8.quantize_column_major_triton(y, sw, strided_k=True), m * n * (elem + 1))
        record("fp8  rescale the product Y, eager (float, 2 multiplies, cast)",
               lambda: lambda: f8.rescale(y, sa, sw, False, dtype), 2 * m * n * elem)
        record("fp8  rescale the product Y, triton (one pass)",
               lambda: lambda: f8.rescale_triton(y, sa, sw, False), 2 * m * n * elem)
        record("fp8  Y = A W2ᵀ dense, all in (row-wise scales, quantize both, _scaled_mm; the fp8_dense pass)",
               lambda: lambda: f8.fp8_rowwise_mm(a, w2.t(), dtype), flops=f)
        record("fp8  Y = A W2ᵀ cuSPARSELt 2:4, alg 0", lambda: fp8_sparse(False), flops=f)
        record("fp8  Y = A W2ᵀ cuSPARSELt 2:4, searched", lambda: fp8_sparse(True), flops=f)
        if backends.fp8_scales_in_matmul(a.device):  # the probe found the epilogue right (else it may break the GPU)
            record("fp8  Y = A W2ᵀ cuSPARSELt 2:4, searched, row scales in its epilogue (alpha vector)",
                   lambda: fp8_sparse(True, torch.rand(m, device=device)), flops=f)
    rows.append({"part": f"  (sparse matmul backend: {backends.sparse_mm_backend(a.device)})", "ms": None})
    sparse_mm = torch.ops.fvcompile.sparse24_mm
    # The weight gradients' rows call the op of that role; their labels keep the names earlier
    # results were recorded under, so that runs compare.
    wgrad_mm = torch.ops.fvcompile.sparse24_weight_grad_mm
    record("op   sparse24_mm(A, W2ᵀ, select=False) (pack + mm)",
           lambda: lambda: sparse_mm(a, w2.t(), select=False), flops=f)
    record("op   sparse24_mm(r, W2ᵀ, square=True) (square+pack + mm)",
           lambda: lambda: sparse_mm(r, w2.t(), select=False, square=True), flops=f)
    record("op   sparse24_mm(h, W2ᵀ, square=True, relu=True) (relu+select+square+pack + mm)",
           lambda: lambda: sparse_mm(h, w2.t(), select=False, square=True, relu=True), flops=f)
    record("op   sparse24_mm(dH, W1, select=False) (pack + mm)",
           lambda: lambda: sparse_mm(dh, w1, select=False), flops=f)
    record("op   sparse24_mm(Aᵀ, dY) (select along tokens + pack + mm)",
           lambda: lambda: wgrad_mm(a.t(), dy, strided_k=False), flops=f)
    record("op   sparse24_mm(rᵀ, dY, square=True)", lambda: lambda: wgrad_mm(r.t(), dy, square=True, strided_k=False), flops=f)
    record("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True) (dW2 in its own layout)",
           lambda: lambda: wgrad_mm(r.t(), dy, square=True, transpose_out=True, strided_k=False), flops=f)
    record("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True, strided_k=True) (the sparse dW2)",
           lambda: lambda: wgrad_mm(r.t(), dy, square=True, transpose_out=True), flops=f)
    record("op   sparse24_mm(dHᵀ, X, strided_k=True, dense_rows=0.05) (the sparse dW1)",
           lambda: lambda: wgrad_mm(dh.t(), x, dense_rows=0.05), flops=f)
    record("     of which: densest_rows(dHᵀ, 0.05) (count nonzeros per feature, top 5%)",
           lambda: lambda: wgrad24.densest_rows(dh.t(), 0.05), m * k * elem)
    # In training the pass counts dH's nonzeros per feature in the graph (one reduction, which
    # Inductor generates); here the same count in eager PyTorch, then the op given it.
    counts = (dh != 0).sum(0)
    record("     the count in one reduction, (dH != 0).sum(0) (eager here; the pass's is Inductor's)",
           lambda: lambda: (dh != 0).sum(0), m * k * elem)
    record("op   the sparse dW1 with row_counts given (as in training)",
           lambda: lambda: wgrad_mm(dh.t(), x, None, counts, dense_rows=0.05), flops=f)
    # FP8: scales, pack, B quantized column-major, the FP8 2:4 matmul and its scaling (epilogue or pass), all in.
    record("op   sparse24_mm(r, W2ᵀ, square=True, fp8=True)",
           lambda: lambda: sparse_mm(r, w2.t(), select=False, square=True, fp8=True), flops=f)
    record("op   sparse24_mm(dH, W1, select=False, fp8=True)",
           lambda: lambda: sparse_mm(dh, w1, select=False, fp8=True), flops=f)
    record("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True, fp8=True)",
           lambda: lambda: wgrad_mm(r.t(), dy, square=True, transpose_out=True, fp8=True, strided_k=False),
           flops=f)
    record("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True, strided_k=True, fp8=True) (the FP8 sparse dW2)",
           lambda: lambda: wgrad_mm(r.t(), dy, square=True, transpose_out=True, fp8=True), flops=f)
    # In training the pass hands the forward and dW2 their scales' maxima from the selection's pass
    # (sparse24_relu_max): what each saves is one read of r.
    r_rows, r_cols = k24.row_col_max(r)
    record("op   sparse24_mm(r, W2ᵀ, square=True, fp8=True, a_max=r's row maxima) (as in training)",
           lambda: lambda: sparse_mm(r, w2.t(), r_rows, select=False, square=True, fp8=True), flops=f)
    record("op   the FP8 sparse dW2 with a_max=r's column maxima (as in training)",
           lambda: lambda: wgrad_mm(r.t(), dy, r_cols, square=True, transpose_out=True, fp8=True), flops=f)
    record("op   sparse24_mm(dHᵀ, X, strided_k=True, dense_rows=0.05, fp8=True) (the FP8 sparse dW1)",
           lambda: lambda: wgrad_mm(dh.t(), x, dense_rows=0.05, fp8=True), flops=f)
    # Host time per call (launches only, no sync): the per-call cuSPARSELt plan is paid on the CPU,
    # and a GPU that waits for the host loses the sparse matmul's gain.
    def host_ms(fn, calls=20):
        import time

        fn()
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = (time.perf_counter() - start) / calls * 1e3
        torch.cuda.synchronize() if device == "cuda" else None
        return elapsed

    compressed = cslt.cslt_pack_triton(a) if backends.sparse_mm_backend(a.device) == "cusparselt" else None
    for name, fn in (("dense torch.mm", lambda: torch.mm(a, w2.t())),
                     ("torch._cslt_sparse_mm alone (packed beforehand; plan as sparse24_mm runs it)",
                      lambda: backends.cslt_mm(compressed, w2.t(), m, False)),
                     ("sparse24_mm(r, W2ᵀ, square=True)", lambda: sparse_mm(r, w2.t(), select=False, square=True)),
                     ("sparse24_mm(r, W2ᵀ, square=True, fp8=True)",
                      lambda: sparse_mm(r, w2.t(), select=False, square=True, fp8=True))):
        try:
            rows.append({"part": f"host ms per call, {name}", "ms": host_ms(fn)})
        except Exception as e:
            rows.append({"part": f"host ms per call, {name}", "ms": None, "error": f"{type(e).__name__}: {e}"[:200]})
    record("e2e  relu(h)² W2ᵀ dense eager", lambda: lambda: torch.mm(torch.relu(h).square(), w2.t()), flops=f)
    record("e2e  sparse24_mm(sparse24_relu(h), W2ᵀ, square=True) eager",
           lambda: lambda: sparse_mm(torch.ops.fvcompile.sparse24_relu(h), w2.t(), select=False, square=True),
           flops=f)
    return rows


def ceilings(rows: list[dict]) -> dict:
    """Upper bounds on the FFN's fwd+bwd speedup from the matmul parts alone (elementwise work and
    launches left out, on both sides). The two matmuls that never go sparse (the first linear and
    dA = dY W2) are taken at the time of the forward's dense second matmul (same FLOPs)."""
    t = {r["part"]: r["ms"] for r in rows if r.get("ms") is not None}
    try:
        dense = {"fwd": t["fwd  Y = A W2ᵀ dense (cuBLAS, W2ᵀ a view)"], "dX": t["bwd  dX = dH W1 dense"],
                 "dW2": t["bwd  dW2 = dYᵀ A dense"], "dW1": t["bwd  dW1 = dHᵀ X dense"]}
        sparse_op = {"fwd": t["op   sparse24_mm(r, W2ᵀ, square=True) (square+pack + mm)"],
                     "dX": t["op   sparse24_mm(dH, W1, select=False) (pack + mm)"],
                     "dW2": t.get("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True) (dW2 in its own layout)",
                                  t["op   sparse24_mm(rᵀ, dY, square=True)"])}
        sparse_mm = {"fwd": t["fwd  Y = A W2ᵀ cuSPARSELt, W2ᵀ view, searched"],
                     "dX": t["bwd  dX = dH W1 cuSPARSELt, searched"],
                     "dW2": t["bwd  dW2ᵀ = S(Aᵀ) dY cuSPARSELt, searched"]}
    except KeyError:
        return {}
    never = 2 * dense["fwd"]  # the first linear's forward and dA
    total = never + sum(dense.values())

    def speedup(replace):
        return total / (never + sum(replace.get(k, v) for k, v in dense.items()))

    best = min(sparse_mm.values())
    bounds = {
        "sparse24 (fwd, dX sparse; with packing)": speedup({k: sparse_op[k] for k in ("fwd", "dX")}),
        "sparse24 + sparse dW2 (with packing)": speedup(sparse_op),
        "all four sparse-able matmuls, packing free (dW1 at the best sparse time)":
            speedup({**sparse_mm, "dW1": best}),
    }
    dw = {"dW2": t.get("op   sparse24_mm(rᵀ, dY, square=True, transpose_out=True, strided_k=True) (the sparse dW2)"),
          "dW1": t.get("op   the sparse dW1 with row_counts given (as in training)",
                       t.get("op   sparse24_mm(dHᵀ, X, strided_k=True, dense_rows=0.05) (the sparse dW1)"))}
    if all(dw.values()):  # sparse_weight_grad="all", as the ops run it
        bounds["sparse24 all four sparse (strided dW2, dW1 with 5% dense features; with packing)"] = speedup(
            {"fwd": sparse_op["fwd"], "dX": sparse_op["dX"], **dw})
    # FP8 (fp8=True): all six matmuls in FP8, the 2:4 ones at cuSPARSELt's searched time and the
    # dense ones at _scaled_mm's (both measured at the forward's shape, the same FLOPs as the others),
    # packing and quantization free on both sides: bounds, against the bf16 dense FFN and against
    # the FFN with all six matmuls dense FP8. (The ops timed alone are no bound: they leave out the
    # dense FP8 side's quantization, a large share of its step, so they understate the speedup
    # measured end to end; bench/README.md.)
    fp8_dense = t.get("fp8  Y = A W2ᵀ dense torch._scaled_mm")
    fp8_sparse = t.get("fp8  Y = A W2ᵀ cuSPARSELt 2:4, searched")
    if fp8_dense and fp8_sparse:
        for label, n in (("sparse24 fp8 (fwd, dX 2:4)", 2), ("sparse24 fp8 + sparse dW2", 3),
                         ("sparse24 fp8, all four 2:4", 4)):
            step = (6 - n) * fp8_dense + n * fp8_sparse
            bounds[f"{label}, packing and quantization free, vs bf16 dense"] = total / step
            bounds[f"{label}, packing and quantization free, vs FP8 dense"] = 6 * fp8_dense / step
    return bounds


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes: checks this script")
    parser.add_argument("--ceilings-of", default=None,
                        help="print the ceilings of a recorded run (a gpu_check JSON) instead of timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.ceilings_of:
        with open(args.ceilings_of) as f:
            recorded = json.load(f)
        print(f"{args.ceilings_of} ({recorded['env']['device']}, {recorded['env']['date']}):")
        rows = recorded["bench"]["sparse24_parts"]
        if any(r["part"].strip() == "(sparse matmul backend: None)" for r in rows):
            print("  INVALID where packing or FP8 is in: this run's `op` rows are the emulation (its process "
                  "found no sparse matmul backend)")
        for name, value in ceilings(rows).items():
            print(f"  {name:<74} {value:.2f}x")
        return []
    if args.dry_run:
        rows = parts(64, 256, 64, torch.float16, "cpu")
        print("\ndry run (CPU, Triton interpreter, 64 x 256 x 64 fp16)")
    else:
        rows = parts(args.tokens)
        print(f"\nsparse path parts on {torch.cuda.get_device_name()}, {args.tokens} tokens, 4096 <-> 21504, bf16")
    for r in rows:
        if r.get("ms") is None:
            print(f"  {r['part']:<66} {r.get('error', '')}")
            continue
        rate = f"{r['GB/s']:8.0f} GB/s" if "GB/s" in r else f"{r['TFLOP/s']:8.0f} TFLOP/s" if "TFLOP/s" in r else ""
        print(f"  {r['part']:<66} {r['ms']:8.3f} ms {rate}")
    bounds = ceilings(rows)
    if bounds:
        print("  fwd+bwd speedup ceilings from these matmul parts (elementwise work left out):")
        for name, value in bounds.items():
            print(f"    {name:<72} {value:.2f}x")
        rows.append({"part": "fwd+bwd speedup ceilings", "ms": None, "ceilings": bounds})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
