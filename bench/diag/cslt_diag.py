"""Which step of the 2:4 sparse path fails on this GPU? Each step runs in a process of its own
(an illegal instruction poisons the CUDA context of the process it happens in).

    python bench/diag/cslt_diag.py --out $OUT
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
import torch
torch.manual_seed(0)
def two_of_four(m, k, dtype):
    x = torch.randn(m, k, device="cuda")
    keep = x.abs().reshape(m, k // 4, 4).argsort(-1, descending=True)[..., :2]
    mask = torch.zeros(m, k // 4, 4, device="cuda", dtype=torch.bool).scatter_(-1, keep, True).reshape(m, k)
    return (x * mask).to(dtype)
a = two_of_four(M, 128, DTYPE); b = torch.randn(128, 64, device="cuda").to(DTYPE)
"""

STEPS = {
    "versions": "import torch; print(torch.version.cuda, torch.backends.cusparselt.version(), torch.cuda.get_device_name())",
    "cslt_compress": SETUP + "c = torch._cslt_compress(a); torch.cuda.synchronize(); print(c.shape)",
    "cslt_sparse_mm": SETUP + "c = torch._cslt_compress(a); o = torch._cslt_sparse_mm(c, b); torch.cuda.synchronize(); "
                      "print((o.float() - a.float() @ b.float()).abs().max().item())",
    "cslt_sparse_mm_search": SETUP + "c = torch._cslt_compress(a); print(torch._cslt_sparse_mm_search(c, b)); torch.cuda.synchronize()",
    "cslt_sparse_mm transpose_result": SETUP + "c = torch._cslt_compress(a); o = torch._cslt_sparse_mm(c, b, transpose_result=True); "
                      "torch.cuda.synchronize(); print(o.shape, (o.float().t()[:M] - a.float() @ b.float()).abs().max().item())",
    "cslt_sparse_mm_search transpose_result": SETUP + "c = torch._cslt_compress(a); "
                      "print(torch._cslt_sparse_mm_search(c, b, transpose_result=True)); torch.cuda.synchronize()",
    "our cslt pack": SETUP + "from fvcompile.kernels.sparse24_cslt import cslt_pack_triton, cslt_pack_reference\n"
                     "p = cslt_pack_triton(a); torch.cuda.synchronize(); r = cslt_pack_reference(a)\n"
                     "c = torch._cslt_compress(torch.nn.functional.pad(a, (0, 0, 0, (-M) % 64)))\n"
                     "print('ref==triton', torch.equal(p.view(torch.uint8), r.view(torch.uint8)), 'triton==cslt', "
                     "torch.equal(p.view(torch.uint8), c.view(torch.uint8)), p.shape, c.shape)",
    "our cslt pack + sparse_mm": SETUP + "from fvcompile.kernels.sparse24_cslt import cslt_pack_triton\n"
                     "o = torch._cslt_sparse_mm(cslt_pack_triton(a), b); torch.cuda.synchronize(); "
                     "print((o.float()[:M] - a.float() @ b.float()).abs().max().item())",
    "our selection kernels": SETUP + "from fvcompile.kernels import sparse24 as k\nh = torch.randn(100, 256, device='cuda', dtype=DTYPE)\n"
                     "print(torch.equal(k.sparse24_relu_triton(h), k.sparse24_relu_reference(h)), "
                     "torch.equal(k.sparse24_select_triton(h.t()), k.sparse24_mask_reference(h.t())))\n"
                     "from fvcompile.kernels import sparse24_cutlass as c\n"
                     "v, m = c.relu2_sparse24_pack_triton(h); torch.cuda.synchronize(); print(v.shape, m.shape)",
    "backend probe": "import torch; from fvcompile.kernels import sparse24_backends as k; print(k.sparse_mm_backend('cuda'))",
}


ONCE_PER_CASE = ("cslt_sparse_mm", "cslt_sparse_mm transpose_result", "our cslt pack", "our cslt pack + sparse_mm")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import import_fvcompile

    import_fvcompile()  # writes the shim the steps import from
    env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1",
           "PYTHONPATH": os.pathsep.join(["/tmp/fvcompile_shim", os.environ.get("PYTHONPATH", "")])}
    results = {}
    for dtype in ("torch.float16", "torch.bfloat16"):
        for m in (128, 96):
            for name, code in STEPS.items():
                if (dtype, m) != ("torch.float16", 128) and name not in ONCE_PER_CASE:
                    continue
                code = f"import torch\nM = {m}\nDTYPE = {dtype}\n" + code
                key = f"{name} [{dtype.split('.')[1]}, {m} rows]"
                try:
                    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                          timeout=120, cwd="/tmp")
                    ok = proc.returncode == 0
                    text = (proc.stdout.strip() if ok else proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip()[-400:])
                except subprocess.TimeoutExpired:
                    ok, text = False, "timed out"
                results[key] = {"ok": ok, "out": text}
                print(f"{'ok  ' if ok else 'FAIL'} {key}: {text if ok else text[-300:]}", flush=True)
    (Path(args.out) / "cslt_diag.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
