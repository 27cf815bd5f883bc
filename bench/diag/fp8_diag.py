"""Which step of the FP8 2:4 matmul fails on this GPU? On an H100 the FP8 probe of
`sparse24_backends` answered "no" while `torch._cslt_sparse_mm` on cuSPARSELt's own FP8
compress ran. Each step runs in a process of its own (a failing cuSPARSELt call can poison the
CUDA context), prints what it found, and the next step runs regardless.

    python bench/diag/fp8_diag.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SETUP = """
import torch, traceback
from fvcompile.kernels import sparse24_cslt as cslt
from fvcompile.kernels import sparse24_fp8 as f8
from fvcompile.kernels.sparse24 import mask24
M, K, N = {m}, {k}, {n}
a, b = (t.cuda() for t in f8.fp8_exact_operands(M, K, N))
s = torch.where(mask24(a.abs()), a, 0)                 # S(a)
sa, sb = f8.row_scale(s, False, False), f8.tensor_scale(b)
q = f8.quantize(s, sa[:, None])                        # e4m3(S(a) / sa), (M, K)
m_pad = cslt.padded_rows(M)
q_pad = torch.nn.functional.pad(q.view(torch.uint8), (0, 0, 0, m_pad - M)).view(f8.FP8)
b8 = f8.quantize_column_major_triton(b, sb, n_multiple=16)
exact = q.float() @ b8.float()[:, :N]                  # the unscaled product, fp32
def err(out, ref):
    out = out.float()
    return f"max abs err {{(out - ref).abs().max().item():.4g}} (ref max {{ref.abs().max().item():.4g}})"
def attempt(name, fn):
    try:
        print(name, "->", fn(), flush=True)
    except Exception as e:
        print(name, "-> FAILED", type(e).__name__, str(e)[:400].replace(chr(10), " "), flush=True)
"""

STEPS = {
    "versions": "import torch; print(torch.version.cuda, torch.backends.cusparselt.version(), torch.cuda.get_device_name())",
    "operands": SETUP + (
        "print('b8', b8.shape, b8.stride(), b8.dtype, 'sa', sa[:4].tolist(), 'sb', sb.item())\n"
        "ours = cslt.cslt_pack_triton(a, out_dtype=f8.FP8, scale=sa)\n"
        "print('ours', ours.shape, ours.dtype, ours.stride())\n"
        "attempt('torch._cslt_compress(q padded)', lambda: (lambda c: (c.shape, c.dtype, c.numel(), ours.numel(),"
        " torch.equal(c.reshape(-1).view(torch.uint8), ours.reshape(-1).view(torch.uint8)) if c.numel() == ours.numel() else 'sizes differ'))"
        "(torch._cslt_compress(q_pad)))\n"
        "attempt('torch._cslt_compress(q unpadded)', lambda: (lambda c: (c.shape, c.numel()))(torch._cslt_compress(q)))\n"),
    # cuSPARSELt's own compress, then ours, each with the calls the FP8 path makes.
    **{f"mm {source} {variant}": SETUP + (
        ("c = torch._cslt_compress(q_pad)\n" if source == "cslt_compress" else
         "c = cslt.cslt_pack_triton(a, out_dtype=f8.FP8, scale=sa)\n")
        + {"plain": "attempt('mm bf16 out', lambda: err(torch._cslt_sparse_mm(c, b8, out_dtype=torch.bfloat16)[:M, :N], exact))\n",
           "no out_dtype": "attempt('mm default out', lambda: (lambda o: (o.dtype, err(o[:M, :N], exact)))(torch._cslt_sparse_mm(c, b8)))\n",
           "fp32 out": "attempt('mm fp32 out', lambda: err(torch._cslt_sparse_mm(c, b8, out_dtype=torch.float32)[:M, :N], exact))\n",
           "search": "from fvcompile.kernels import sparse24_backends as be\n"
                     "attempt('plan', lambda: be.cslt_plan(c, b8, False, torch.bfloat16))\n"
                     "attempt('mm searched', lambda: err(torch._cslt_sparse_mm(c, b8, out_dtype=torch.bfloat16, **be.cslt_plan(c, b8, False, torch.bfloat16))[:M, :N], exact))\n",
           "alpha": "al = torch.nn.functional.pad(sa * sb, (0, m_pad - M))\n"
                    "attempt('mm alpha', lambda: err(torch._cslt_sparse_mm(c, b8, alpha=al, out_dtype=torch.bfloat16)[:M, :N], exact * (sa * sb)[:, None]))\n",
           "transposed": "attempt('mm transpose_result', lambda: err(torch._cslt_sparse_mm(c, b8, out_dtype=torch.bfloat16, transpose_result=True)[:N, :M].t(), exact))\n",
           }[variant])
        for source in ("cslt_compress", "ours")
        for variant in ("plain", "no out_dtype", "fp32 out", "search", "alpha", "transposed")},
    "fp8_mm_cusparselt vs reference": SETUP + (
        "ref = f8.fp8_mm_reference(a, b)\n"
        "for sim in (False, True):\n"
        "    attempt(f'fp8_mm_cusparselt scales_in_matmul={{sim}}', lambda: err(f8.fp8_mm_cusparselt(a, b, scales_in_matmul=sim), ref.float()))\n"
        "from fvcompile.kernels import sparse24_backends as be\n"
        "attempt('fp8_probe', lambda: be.fp8_probe('cuda'))\n"),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="96,512,64", help="M,K,N (the probe's shape by default)")
    args = parser.parse_args(argv)
    m, k, n = (int(v) for v in args.shape.split(","))
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    gpu_check.import_fvcompile()  # the shim the steps import fvcompile from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["/tmp/fvcompile_shim", os.environ.get("PYTHONPATH", "")])}
    results = {}
    for name, code in STEPS.items():
        try:
            proc = subprocess.run([sys.executable, "-c", code.format(m=m, k=k, n=n)], env=env, cwd="/tmp",
                                  capture_output=True, text=True, timeout=60)
            results[name] = {"returncode": proc.returncode, "stdout": proc.stdout[-3000:], "stderr": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            results[name] = {"error": "timed out"}
        r = results[name]
        print(f"== {name} (rc {r.get('returncode')})\n{r.get('stdout', '')}{r.get('stderr', '')[-600:] if r.get('returncode') else ''}",
              flush=True)
    (Path(args.out) / f"fp8_diag_{m}x{k}x{n}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
