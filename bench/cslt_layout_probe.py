"""Record what cuSPARSELt's compressed format looks like on this GPU (for kernels/sparse24_cslt.py).

torch._cslt_compress is too slow to run every step (several times the sparse matmul it feeds;
bench/README.md): a Triton kernel that writes the same format is the fix, and the format is
undocumented. This compresses 2:4 inputs whose kept values name their own column (and, in a
second copy, their row) and whose patterns are random, and saves inputs and outputs;
tests/kernels/test_sparse24_cslt.py reads them back on CPU (fixtures in tests/kernels/data/).

    python bench/cslt_layout_probe.py --out $OUT
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

PATTERNS = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
                        dtype=torch.bool)


def probe(m: int, k: int, trials: int, gen: torch.Generator, dtype=torch.bfloat16) -> dict:
    cases = []
    exact = 256 if dtype == torch.bfloat16 else 16  # integers a dtype holds exactly (e4m3: 16)
    for t in range(trials):
        pattern = PATTERNS[torch.randint(0, 6, (m, k // 4), generator=gen)].reshape(m, k)
        cols = (torch.arange(k) % exact + 1).float().expand(m, k)
        rows = (torch.arange(m) % exact + 1).float()[:, None].expand(m, k)
        for name, value in (("col", cols), ("row", rows)):
            dense = torch.where(pattern, value, 0.0).to(dtype).cuda()
            out = torch._cslt_compress(dense)
            cases.append({"m": m, "k": k, "trial": t, "value": name, "dtype": str(dtype), "dense": dense.cpu(),
                          "compressed_shape": tuple(out.shape), "compressed_dtype": str(out.dtype),
                          "raw": out.contiguous().reshape(-1).view(torch.uint8).cpu()})
    return cases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    cases = []
    # bf16 (the fixture of tests/kernels) and FP8 e4m3 (for an FP8 path).
    dtypes = [torch.bfloat16] + ([torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [])
    for dtype in dtypes:
        for m, k in ((128, 128), (64, 64), (256, 384), (96, 256)):
            try:
                cases += probe(m, k, 4, gen, dtype)
            except Exception as e:  # an unsupported size or dtype is information too
                cases.append({"m": m, "k": k, "dtype": str(dtype), "error": f"{type(e).__name__}: {e}"[:300]})
                print(m, k, dtype, cases[-1]["error"])
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": cases}
    out = Path(args.out) / "cslt_layout_probe.pt"
    torch.save(meta, out)
    for c in cases:
        if "error" not in c:
            print(c["dtype"], c["m"], c["k"], c["trial"], c["value"], c["compressed_shape"], c["compressed_dtype"],
                  c["raw"].numel())
    print("saved", out)


if __name__ == "__main__":
    main()
