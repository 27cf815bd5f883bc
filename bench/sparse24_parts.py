"""Where a 2:4 FFN's time goes on a GPU: each piece of the sparse path timed alone.

The first H100 run (2026-11-26) found the sparse24 FFN slower than dense (0.33x forward);
this times every candidate piece at one Llama-3-8B shape so that one GPU call shows which
one to fix: our Triton selection/pack kernels (two block shapes), cuSPARSELt's compress and
matmul (B as a transposed view or contiguous, default vs searched algorithm), PyTorch's
fused 2:4 tile, and the dense matmul they must beat. Each piece is timed on its own; a
failure is recorded, not raised.

    python bench/sparse24_parts.py --tokens 8192
"""
from __future__ import annotations

import argparse
import json

import torch

from fvcompile.kernels import sparse24 as k24


def parts(tokens: int = 8192, hidden: int = 21504, dim: int = 4096, dtype=torch.bfloat16) -> list[dict]:
    import triton.testing

    def ms(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    a = k24.sparse24_relu_triton(h).square()  # the 2:4 activation
    w2 = torch.randn(dim, hidden, device="cuda", dtype=dtype)
    b_view, b_contig = w2.t(), w2.t().contiguous()
    rows: list[dict] = []

    def record(name, make):
        try:
            rows.append({"part": name, "ms": ms(make())})
        except Exception as e:
            rows.append({"part": name, "ms": None, "error": f"{type(e).__name__}: {e}"[:200]})

    record("dense mm a @ W2^T (cuBLAS, the bar)", lambda: lambda: torch.mm(a, b_view))
    record("inductor-like relu(h)^2 (eager pointwise)", lambda: lambda: torch.relu(h).square())
    record("triton sparse24_relu 32x32", lambda: lambda: k24.sparse24_relu_triton(h))
    record("triton sparse24_relu 64x64", lambda: lambda: k24.sparse24_relu_triton(h, block_m=64, block_g=64))
    record("triton relu2+2:4+pack (CUTLASS layout) 32x8",
           lambda: lambda: k24.relu2_sparse24_pack_triton(h))
    record("triton relu2+2:4+pack (CUTLASS layout) 64x16",
           lambda: lambda: k24.relu2_sparse24_pack_triton(h, block_m=64, block_c=16))
    record("torch._sparse_semi_structured_tile(a) cusparselt (2:4 both ways)",
           lambda: lambda: torch._sparse_semi_structured_tile(a, "", False))
    record("torch._cslt_compress(a)", lambda: lambda: torch._cslt_compress(a))

    def cslt(b, **kw):
        compressed = torch._cslt_compress(a)
        return lambda: torch._cslt_sparse_mm(compressed, b, **kw)

    record("cslt mm, B transposed view, alg 0", lambda: cslt(b_view))
    record("cslt mm, B contiguous, alg 0", lambda: cslt(b_contig))

    def searched():
        compressed = torch._cslt_compress(a)
        alg = torch._cslt_sparse_mm_search(compressed, b_view)
        rows.append({"part": "cslt best alg id (search)", "ms": None, "alg_id": alg})
        return lambda: torch._cslt_sparse_mm(compressed, b_view, alg_id=alg)

    record("cslt mm, B transposed view, searched alg", searched)
    record("fvcompile.sparse24_mm op (select + compress + mm)",
           lambda: lambda: torch.ops.fvcompile.sparse24_mm(a, b_view))
    record("fvcompile.sparse24_mm op, select=False (compress + mm)",
           lambda: lambda: torch.ops.fvcompile.sparse24_mm(a, b_view, select=False))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = parts(args.tokens)
    print(f"\nsparse path parts on {torch.cuda.get_device_name()}, {args.tokens} tokens, 4096 <- 21504, bf16")
    for r in rows:
        value = f"{r['ms']:.3f} ms" if r.get("ms") is not None else r.get("error", r.get("alg_id", ""))
        print(f"  {r['part']:<62} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
