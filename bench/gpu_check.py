"""The one script for a lent GPU (H100/H200): check every Triton kernel against its reference
on CUDA, check fvcompile end to end on CUDA, then time the GPU benchmarks. Prints a short
table last and writes JSON into --out after every step.

The steps run in the order their results matter (the FFN at the first token count, the parts
and their bounds, the end-to-end checks, the kernel tests on CUDA, SAAP attention against flash,
FP8 "all" at the fewest tokens with and without CUDA graphs, then the other token counts) within
--budget-s seconds: a lent GPU has 15 minutes, its start included, and a step that would start
with too little time left is skipped and listed as such.

    python bench/gpu_check.py --out $OUT    (imports the checkout; no install needed)
    TRITON_INTERPRET=1 python bench/gpu_check.py --out /tmp/gc --tokens 256,128   (CPU dry run)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def import_fvcompile() -> None:
    """Make `fvcompile` importable without an install: on the lent GPU machine an editable
    install with our package-dir mapping did not import, so build the package tree in /tmp."""
    try:
        import fvcompile.passes  # noqa: F401
        return
    except ImportError:
        pass
    shim = Path("/tmp/fvcompile_shim")
    pkg = shim / "fvcompile"
    pkg.mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "fvcompile").glob("*.py"):
        (pkg / f.name).write_text(f.read_text())
    for sub in ("kernels", "passes", "models"):
        link = pkg / sub
        if not link.exists():
            link.symlink_to(ROOT / sub)
    sys.path.insert(0, str(shim))
    for name in [m for m in sys.modules if m == "fvcompile" or m.startswith("fvcompile.")]:
        del sys.modules[name]

CHECKS: list[dict] = []
# A CPU dry run (TRITON_INTERPRET=1, small shapes) exercises this script's code before a GPU call.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(name: str):
    def wrap(fn):
        def run():
            start = time.perf_counter()
            try:
                detail = fn() or ""
                CHECKS.append({"check": name, "ok": True, "detail": str(detail), "s": time.perf_counter() - start})
            except Exception as e:
                traceback.print_exc()
                CHECKS.append({"check": name, "ok": False, "detail": f"{type(e).__name__}: {e}"[:300],
                               "s": time.perf_counter() - start})
        run.__name__ = fn.__name__
        return run
    return wrap


@check("sparse24 kernels vs reference (fp16/bf16, aligned and ragged rows)")
def kernels_sparse24():
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    from fvcompile.kernels import sparse24 as k24
    from fvcompile.kernels import sparse24_backends as backends
    from fvcompile.kernels import sparse24_cslt as cslt
    from fvcompile.kernels import sparse24_cutlass as cutlass

    done = 0
    # The interpreter rounds bf16 its own way (NOTES.md): the CPU dry run checks fp16 only.
    for dtype in (torch.float16, torch.bfloat16)[: 2 if DEVICE == "cuda" else 1]:
        for m, k in ((64, 128), (100, 256), (4096, 21504))[: 3 if DEVICE == "cuda" else 2]:
            h = torch.randn(m, k, device=DEVICE, dtype=dtype)
            torch.testing.assert_close(k24.sparse24_relu_triton(h), k24.sparse24_relu_reference(h), atol=0, rtol=0)
            for got, expected in zip(k24.sparse24_relu_max_triton(h), k24.sparse24_relu_max_reference(h)):
                assert torch.equal(got, expected), "sparse24_relu_max: r or its maxima differ"
            assert torch.equal(cslt.cslt_pack_triton(h).view(torch.int16), cslt.cslt_pack_reference(h).view(torch.int16))
            assert torch.equal(cslt.cslt_pack_triton(torch.relu(h), square=True).view(torch.int16),
                               cslt.cslt_pack_reference(torch.relu(h), square=True).view(torch.int16))
            assert torch.equal(cslt.cslt_pack_triton(h, square=True, relu=True).view(torch.int16),
                               cslt.cslt_pack_reference(h, square=True, relu=True).view(torch.int16))
            ht = h.t()  # the weight gradient's selection reads a transposed view in place
            torch.testing.assert_close(k24.sparse24_select_triton(ht), k24.sparse24_mask_reference(ht), atol=0, rtol=0)
            values, meta = cutlass.relu2_sparse24_pack_triton(h)
            dense = k24.sparse24_relu_reference(h).square()
            rows = cutlass.padded_rows(m)
            padded = torch.zeros(rows, k, device=DEVICE, dtype=dtype)
            padded[:m] = dense
            ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(padded)
            torch.testing.assert_close(values, ref_values, atol=0, rtol=0)
            assert torch.equal(meta, ref_meta), "metadata differs from PyTorch's CUTLASS layout"
            b = torch.randn(k, 64, device=DEVICE, dtype=dtype)
            out = torch.ops.fvcompile.sparse24_mm(dense, b)
            torch.testing.assert_close(out.float(), (dense.float() @ b.float()), atol=0.5, rtol=5e-2)
            r = k24.sparse24_relu_reference(h)  # square=True: r² @ b with r² never written
            out = torch.ops.fvcompile.sparse24_mm(r, b, select=False, square=True)
            torch.testing.assert_close(out.float(), (dense.float() @ b.float()), atol=0.5, rtol=5e-2)
            bt = torch.randn(m, 64, device=DEVICE, dtype=dtype)  # selection along tokens, transposed view
            out = torch.ops.fvcompile.sparse24_weight_grad_mm(h.t(), bt, strided_k=False)
            torch.testing.assert_close(out.float(), k24.sparse24_mask_reference(h.t()).float() @ bt.float(),
                                       atol=0.5, rtol=5e-2)
            # Tokens padded to 64s and grouped strided (the sparse weight gradients), read in place.
            pad = cslt.strided_k_padded(m) - m
            order = cslt.strided_order(m + pad, DEVICE)
            out = torch.ops.fvcompile.sparse24_weight_grad_mm(h.t(), bt)  # strided_k=True, its default
            ht_p, bt_p = torch.nn.functional.pad(h.t(), (0, pad)), torch.nn.functional.pad(bt, (0, 0, 0, pad))
            expected = k24.sparse24_mask_reference(ht_p[:, order]).float() @ bt_p[order].float()
            torch.testing.assert_close(out.float(), expected, atol=0.5, rtol=5e-2)
            done += 1
    fp8 = "FP8 not checked (CPU)"
    if DEVICE == "cuda":  # FP8: our pack equals the reference at full size, and the FP8 matmul its formula
        from fvcompile.kernels import sparse24_fp8 as f8

        h = torch.randn(4096, 21504, device=DEVICE, dtype=torch.bfloat16)
        scale = f8.row_scale(h, False, False)
        assert torch.equal(cslt.cslt_pack_triton(h, out_dtype=f8.FP8, scale=scale).view(torch.uint8),
                           cslt.cslt_pack_reference(h, out_dtype=f8.FP8, scale=scale).view(torch.uint8))
        # The sparse dW2's A: rᵀ, a transposed view read in place, tokens (4005 -> 4032) strided,
        # squared, scaled by r's column maxima; every tile shape the parts bench times.
        r = k24.sparse24_relu_triton(torch.randn(4005, 2048, device=DEVICE, dtype=torch.bfloat16))
        col_scale = f8.row_scale(r.t(), square=True, relu=False)  # rᵀ's rows: r's columns
        expected = cslt.cslt_pack_reference(r.t(), square=True, out_dtype=f8.FP8, scale=col_scale, strided_k=True)
        for bm, bk in ((16, 256), (64, 64), (128, 64), (32, 128)):
            got = cslt.cslt_pack_triton(r.t(), square=True, out_dtype=f8.FP8, scale=col_scale, strided_k=True,
                                        block_m=bm, block_k=bk)
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (bm, bk)
        # The sparse dW2's B: tokens strided, both dims ragged (8005 -> 8064 tokens, 4104 -> 4112 columns).
        dy = torch.randn(8005, 4104, device=DEVICE, dtype=torch.bfloat16)
        sb = f8.tensor_scale(dy)
        assert torch.equal(f8.quantize_column_major_triton(dy, sb, strided_k=True, n_multiple=16).view(torch.uint8),
                           f8.quantize_column_major_reference(dy, sb, strided_k=True, n_multiple=16).view(torch.uint8))
        fp8 = "FP8 packs (rows; the dW2's transposed strided view) and strided quantization equal (the FP8 matmul: a later check)"
    h = torch.randn(256, 512, device=DEVICE, dtype=torch.float16, requires_grad=True)
    out = torch.ops.fvcompile.sparse24_relu(h)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(h.grad, (k24.sparse24_relu_reference(h.detach()) > 0).half())
    return (f"{done} shape/dtype cases equal; {fp8}; sparse tensor cores: "
            f"{backends.sparse_tensor_cores_available(torch.device(DEVICE))} ({backends.sparse_mm_backend(torch.device(DEVICE))})"
            + (f"; {backends.cslt_search_off}" if backends.cslt_search_off else ""))


@check("FP8 2:4 matmul at full size vs its formula (both scalings, transposed results)")
def fp8_matmul_full_size():
    """A check of its own, run after the main numbers: an FP8 cuSPARSELt call that breaks the CUDA
    context (as a search once did: bench/diag/README.md) then costs only the steps after it in
    this process."""
    from fvcompile.kernels import sparse24_backends as backends
    from fvcompile.kernels import sparse24_fp8 as f8

    if not backends.fp8_sparse_mm_available(DEVICE):
        return f"no FP8 2:4 matmul here ({backends.no_sparse_mm_reason(DEVICE) or 'its FP8 probe failed'})"
    scaled_by = backends.fp8_scales_in_matmul(DEVICE)  # the probe's choice; the rescale pass always
    h = torch.randn(4096, 21504, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(21504, 256, device=DEVICE, dtype=torch.bfloat16)
    done = []
    for flags in (dict(select=True), dict(select=False, square=True, relu=True)):
        for transpose_out in (False, True):
            expected = f8.fp8_mm_reference(h, b, **flags, transpose_out=transpose_out).float()
            for in_matmul in sorted({False, scaled_by}):
                got = f8.fp8_mm_cusparselt(h, b, **flags, transpose_out=transpose_out,
                                           scales_in_matmul=in_matmul).float()
                error = ((got - expected).norm() / expected.norm()).item()
                assert error < 1e-2, (flags, transpose_out, in_matmul, error)
                done.append(f"{error:.1e}")
    return (f"{len(done)} cases within 1e-2 of the formula (relative errors {', '.join(done)}); scaled "
            f"{'in cuSPARSELt and by our pass' if scaled_by else 'by our pass only: the epilogue failed its probe'}")


@check("fvcompile.optimize on llama-tiny (CUDA, Inductor/Triton) matches eager fwd+bwd")
def llama_parity():
    from fvcompile.testing import assert_train_step_parity

    compiled, eager = assert_train_step_parity("llama-tiny", DEVICE, atol=1e-4, rtol=1e-4, fullgraph=True)
    return f"loss {compiled:.5f} vs eager {eager:.5f}"


@check("sparse24 pass on llama-tiny-relu2 (CUDA bf16): rewritten, finite, trains")
def sparse24_llama():
    import fvcompile
    from fvcompile.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      ffn="relu2", max_seq_len=256)
    torch.manual_seed(0)
    model = Llama(cfg).to(DEVICE, torch.float16 if DEVICE == "cpu" else torch.bfloat16)
    optimized = fvcompile.optimize(model, passes=["sparse24"])
    tokens = torch.randint(0, 256, (2, 129), device=DEVICE)
    from torch._inductor.utils import fresh_cache

    from fvcompile.models.llama import next_token_loss

    with fresh_cache():  # a cached graph would run no pass, and this checks the pass on this GPU
        loss = next_token_loss(optimized, tokens)
        loss.backward()
    report = optimized.fvcompile_report
    assert report.rewritten("sparse24") == 2, report.summary()
    assert torch.isfinite(loss)
    return report.summary() + " | " + "; ".join(sorted({n for r in report.pass_runs() for n in r.result.notes}))


def run_in_subprocess(cmd: list[str], timeout: int) -> dict:
    """Run cmd with the checkout importable (the shim of import_fvcompile); a crash stays there."""
    import os
    import subprocess

    path = os.pathsep.join(["/tmp/fvcompile_shim", str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])
    try:
        # cwd elsewhere: `python -m pytest` puts cwd first on sys.path, and the checkout's bare
        # fvcompile/ folder (without its mapped subpackages) would shadow the shim.
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, cwd="/tmp", capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"cmd": cmd[1:], "error": f"timed out after {timeout} s"}
    print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
    return {"cmd": cmd[1:], "returncode": proc.returncode, "stdout_tail": proc.stdout[-3000:],
            "stderr_tail": proc.stderr[-2000:]}


def ffn_bench(out: Path, tokens: str, timeout: float, graphs_of: str = "") -> dict:
    """bench/sparse24.py at these token counts, in a process of its own (a cuSPARSELt call that
    breaks the CUDA context (bench/diag/README.md) then costs these numbers only). It writes its
    JSON as each row fills ('ffn in progress' until the row is done), so a run cut short still
    returns what it timed. graphs_of: only these modes (and the baselines), each also with CUDA graphs."""
    kind = ("gpu" if DEVICE == "cuda" else "cpu") + ("_cudagraphs" if graphs_of else "")
    run = run_in_subprocess([sys.executable, str(ROOT / "bench" / "sparse24.py"), "--device", DEVICE,
                             "--tokens", tokens, "--out", str(out)]
                            + (["--cuda-graphs", "--modes", graphs_of] if graphs_of else []), int(timeout))
    written = sorted(out.glob(f"sparse24_{kind}_????-??-??_{tokens.replace(',', '-')}.json"))
    result = json.loads(written[-1].read_text()) if written else {"ffn": []}
    if run.get("returncode") != 0:
        result["error"] = run.get("error") or run.get("stderr_tail", "")[-500:]
    return result


def suite_bench(out: Path, timeout: float) -> dict:
    """The benchmark suite's GPU part (`fvcompile bench`, issue #19): its quick grid on the Llama
    models with the passes that can pay on a GPU, in a process of its own; the record, tables and
    plots land in out/suite (the same files as a CPU run's)."""
    suite = out / "suite"
    run = run_in_subprocess([sys.executable, "-m", "fvcompile.cli", "bench", "--device", DEVICE, "--quick",
                             "--models", "llama-tiny,llama-tiny-relu2", "--passes", "auto", "--passes", "sparse24",
                             "--out", str(suite)], int(timeout))
    written = sorted(suite.glob("*.md"))
    return {**run, "tables": written[-1].read_text() if written else None}


# SAAP at Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128), the paper's
# 1024 clusters with 32 probed, key blocks of 64, a sink of 4 and a window of 64; the CPU dry run
# takes a tiny version through the interpreter.
SAAP_LLAMA = dict(hq=32, hkv=8, d=128, clusters=1024, probes=32, block_probes=64, kv_block=64, sink=4, window=64)
SAAP_TINY = dict(hq=4, hkv=2, d=16, clusters=8, probes=2, block_probes=4, kv_block=16, sink=4, window=16)


def saap_keys(cfg: dict, length: int, dtype: torch.dtype, seed: int = 0):
    """Synthetic keys with cluster structure: each KV head's keys drawn around its random
    centroids (a key's cluster: the centroid it was drawn around), and random values.
    (k, v (1, Hkv, L, D), key_cluster (1, Hkv, L))."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hkv, d, clusters = cfg["hkv"], cfg["d"], cfg["clusters"]
    centroids = torch.nn.functional.normalize(torch.randn(hkv, clusters, d, device=DEVICE, generator=g), dim=-1)
    key_cluster = torch.randint(0, clusters, (1, hkv, length), device=DEVICE, generator=g)
    k = 4 * centroids[torch.arange(hkv, device=DEVICE)[:, None], key_cluster[0]][None]
    k = (k + torch.randn(k.shape, device=DEVICE, generator=g)).to(dtype)
    return k, torch.randn(k.shape, device=DEVICE, generator=g).to(dtype), key_cluster


def saap_queries(cfg: dict, key_cluster, lq: int, q_block: int, dtype: torch.dtype, seed: int = 0):
    """Random queries at the last `lq` positions, each query block keeping `block_probes` random
    clusters and each query probing `probes` of them (the op's capped per-query probing), and the
    block lists. (q (1, Hq, Lq, D), probed (1, Hq, Lq, P), blocks)."""
    from fvcompile.kernels.saap_layout import build_blocks, per_query

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(1, cfg["hq"], lq, cfg["d"], device=DEVICE, generator=g).to(dtype)
    scores = torch.rand(1, cfg["hq"], -(-lq // q_block), cfg["clusters"], device=DEVICE, generator=g)
    kept = per_query(scores.topk(cfg["block_probes"], -1).indices, lq, q_block)  # (1, Hq, Lq, block_probes)
    mine = torch.rand(kept.shape, device=DEVICE, generator=g).topk(cfg["probes"], -1).indices
    probed = kept.gather(-1, mine)
    blocks = build_blocks(key_cluster, probed, cfg["clusters"], sink=cfg["sink"], window=cfg["window"],
                          q_block=q_block, kv_block=cfg["kv_block"])
    return q, probed, blocks


def _ms(fn) -> float:
    """Milliseconds per call: triton's do_bench on CUDA, one call on CPU (the dry run)."""
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def saap_bench(timeout: float, lengths: list[int]) -> dict:
    """SAAP's Triton kernels (kernels/saap_triton.py): first checked against the reference at a
    small size, then timed at each length (prefill with the keys in slots and by position, decode
    of one token) against SDPA's flash backend, causal, with the time spent building the block
    lists beside them. Lengths (and query block sizes) that would start too late are skipped."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fvcompile.kernels import saap_triton as st
    from fvcompile.kernels.saap_attention import saap_attention_reference
    from fvcompile.kernels.saap_layout import build_blocks

    end = time.monotonic() + timeout
    cuda = DEVICE == "cuda"
    cfg, dtype = (SAAP_LLAMA, torch.bfloat16) if cuda else (SAAP_TINY, torch.float16)  # interpreter: no bf16 dot
    opts = dict(sink=cfg["sink"], window=cfg["window"])
    q_blocks = (128, 64) if cuda else (16,)
    result: dict = {"config": {**cfg, "dtype": str(dtype), "q_blocks": q_blocks}, "rows": [], "skipped": []}

    # Correctness at a small size (queries over every position, then one decoded token).
    small = 1024 if cuda else 64
    errors = {}
    k, v, key_cluster = saap_keys(cfg, small, dtype, seed=1)
    for lq in (small, 1):
        q, probed, blocks = saap_queries(cfg, key_cluster, lq, q_blocks[-1], dtype, seed=lq)
        want = saap_attention_reference(q, k, v, key_cluster, probed, **opts).float()
        runs = {"by position": lambda: st.saap_attention_triton(q, k, v, blocks, lq=lq, lk=small, **opts)}
        if lq > 1:
            slots = st.gather_slots(k, v, blocks.slot_pos)
            runs["slots"] = lambda: st.saap_prefill(q, *slots, blocks, lq=lq, lk=small, **opts)
        for name, run in runs.items():
            error = (run().float() - want).abs().max().item()
            errors[f"{'prefill' if lq > 1 else 'decode'} ({name}) max abs error"] = error
            assert error < (3e-2 if dtype == torch.bfloat16 else 3e-3), (lq, name, error)
    result["check"] = errors

    def dense(q, k, v, causal):  # SDPA flash, GQA natively where it takes it, else k and v expanded
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                                enable_gqa=True), "native"
            except RuntimeError:
                group = q.shape[1] // k.shape[1]
                kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                return lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal), "expanded"

    def timed_dense(fn):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return _ms(fn)

    for length in lengths:
        k, v, key_cluster = saap_keys(cfg, length, dtype)
        for q_block in q_blocks:
            if time.monotonic() > end - (30 if cuda else 5):
                result["skipped"].append(f"{length} tokens, q_block {q_block}")
                continue
            q, probed, blocks = saap_queries(cfg, key_cluster, length, q_block, dtype)
            start = time.perf_counter()  # the block lists, as the op builds them on each call
            build_blocks(key_cluster, probed, cfg["clusters"], q_block=q_block, kv_block=cfg["kv_block"], **opts)
            if cuda:
                torch.cuda.synchronize()
            build_ms = (time.perf_counter() - start) * 1e3
            slots = st.gather_slots(k, v, blocks.slot_pos)
            dense_fn, gqa = dense(q, k, v, True)
            row = {"tokens": length, "q_block": q_block,
                   "pairs computed / causal pairs": blocks.slots_read(length) / (cfg["hq"] * length * (length + 1) / 2),
                   "dense flash ms": timed_dense(dense_fn), "dense gqa": gqa,
                   "saap prefill ms (slots)": _ms(lambda: st.saap_prefill(q, *slots, blocks, lq=length, lk=length,
                                                                         **opts)),
                   "saap prefill ms (by position)": _ms(lambda: st.saap_prefill(
                       q, k, v, blocks, lq=length, lk=length, by_position=True, **opts)),
                   "gather slots ms": _ms(lambda: st.gather_slots(k, v, blocks.slot_pos)),
                   "build blocks ms (one call)": build_ms}
            del slots, blocks
            if q_block == q_blocks[0]:  # decode of the last token: one query over every key
                q1, _, blocks1 = saap_queries(cfg, key_cluster, 1, q_block, dtype, seed=1)
                dense1, _ = dense(q1, k, v, False)
                row["dense flash decode ms"] = timed_dense(dense1)
                row["saap decode ms (by position)"] = _ms(lambda: st.saap_attention_triton(
                    q1, k, v, blocks1, lq=1, lk=length, **opts))
                row["decode keys read / all keys"] = blocks1.slots_read(1) / (cfg["hq"] * length)
            row["prefill time saved vs flash"] = 1 - row["saap prefill ms (by position)"] / row["dense flash ms"]
            if "saap decode ms (by position)" in row:
                saved = 1 - row["saap decode ms (by position)"] / row["dense flash decode ms"]
                row["decode time saved vs flash"] = saved
            result["rows"].append(row)
            print(row, flush=True)
            del q, probed, dense_fn
        del k, v, key_cluster
        if cuda:
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--tokens", default="8192,4096,16384",
                        help="token counts for the FFN benchmark (the first also for the parts)")
    parser.add_argument("--saap-tokens", default=None,
                        help="sequence lengths for SAAP attention (default: 32768,65536,131072 on CUDA, 128 on CPU)")
    parser.add_argument("--budget-s", type=float, default=500,
                        help="seconds this script may take: later steps get what is left, or are skipped")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s

    def left() -> float:
        return deadline - time.monotonic()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import_fvcompile()
    import triton

    cuda = DEVICE == "cuda"
    env = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
           "capability": torch.cuda.get_device_capability() if cuda else (0, 0),
           "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(env, flush=True)
    bench: dict = {"skipped": []}

    def save():  # after every step, so that a timeout still leaves results
        (out / "gpu_check.json").write_text(json.dumps({"env": env, "checks": CHECKS, "bench": bench},
                                                       indent=1, default=str))

    kernels_sparse24()
    print(CHECKS[-1], flush=True)
    save()
    tokens = args.tokens.split(",")
    # The steps in the order their results matter; each gets the time left (capped), none starts
    # with too little. The first token count's FFN numbers come first.
    steps = [(f"ffn {tokens[0]} tokens", 240, lambda t: ffn_bench(out, tokens[0], t))]
    if cuda:
        # The pieces: FP8 calls into cuSPARSELt can break the CUDA context (bench/diag/cslt_diag.py), so
        # they come after the numbers above.
        import cslt_layout_probe
        import sparse24_parts

        steps += [("sparse24_parts", 150, lambda t: sparse24_parts.main(["--tokens", tokens[0]])),
                  ("cslt_layout_probe", 30, lambda t: cslt_layout_probe.main(["--out", str(out)]))]
    steps += [("check: sparse24 on llama", 60, lambda t: sparse24_llama()),
              ("check: llama parity", 60, lambda t: llama_parity())]
    if cuda:
        steps += [("check: FP8 matmul at full size", 60, lambda t: fp8_matmul_full_size())]
    if cuda:
        steps += [  # The kernel tests, on CUDA tensors this time (CPU runs use the interpreter).
                  ("kernel tests on CUDA", 180, lambda t: run_in_subprocess(
                      # every failure reported (no -x); the compile test needs no GPU: make test runs it
                      [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
                       "-k", "not compiles_for_sm80_and_sm90", str(ROOT / "tests" / "kernels")], int(t)))]
    saap_tokens = [int(n) for n in (args.saap_tokens or ("32768,65536,131072" if cuda else "128")).split(",")]
    steps += [("saap attention", 180, lambda t: saap_bench(t, saap_tokens))]
    steps += [("benchmark suite", 150, lambda t: suite_bench(out, t))]
    # FP8 "all" at the smallest token count is host-bound (four cuSPARSELt plans set up per step on
    # the host; bench/README.md): timed with and without CUDA graphs, with the baselines.
    fewest = min(tokens, key=int)
    steps += [(f"ffn {fewest} tokens, FP8 all with and without CUDA graphs", 150,
               lambda t: ffn_bench(out, fewest, t, graphs_of="sparse24-fp8+dW1"))]
    steps += [(f"ffn {n} tokens", 300, lambda t, n=n: ffn_bench(out, n, t)) for n in tokens[1:]]
    for name, cap, step in steps:
        if args.skip_bench and not name.startswith("check:"):
            continue
        if left() < 30:
            bench["skipped"].append(name)
            continue
        try:
            result = step(min(cap, left()))
        except Exception as e:  # recorded; the steps after it still run
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"[:500]}
        if not name.startswith("check:"):
            bench[name] = result
        print(f"-- {name} done, {left():.0f} s left", flush=True)
        save()
    ffn_rows = [r for name in bench if name.startswith("ffn ") for r in bench[name].get("ffn", [])]
    print("\n== gpu_check summary ==")
    print(f"{env['device']} (sm{env['capability'][0]}{env['capability'][1]}), torch {env['torch']}, "
          f"triton {env['triton']}")
    for c in CHECKS:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}  ({c['s']:.1f} s)  {c['detail'][:150]}")
    tests = bench.get("kernel tests on CUDA")
    if tests:
        print(f"kernel tests on CUDA: return code {tests.get('returncode')} {tests.get('error', '')} "
              f"{tests.get('stdout_tail', '').strip().splitlines()[-1:]}")
    for name in [n for n in bench if isinstance(bench[n], dict) and "error" in bench[n]] + bench["skipped"]:
        print(f"{name}: {'skipped (out of time)' if name in bench['skipped'] else bench[name]['error'][:300]}")
    for r in ffn_rows:
        print(f"sparse24 FFN {r['tokens']} tokens{'' if r['valid'] else ' (INVALID: check failed)'}: fwd {r['speedup fwd vs relu2 dense']:.2f}x, "
              f"fwd+bwd {r['speedup fwd+bwd vs relu2 dense']:.2f}x vs relu2 dense; "
              f"fwd+bwd {r['speedup fwd+bwd vs swiglu dense']:.2f}x vs SwiGLU dense; "
              + "; ".join(f"{k[len('speedup fwd+bwd of '):]} {v:.2f}x" for k, v in r.items()
                          if k.startswith("speedup fwd+bwd of")))
    for r in bench.get("saap attention", {}).get("rows", []):
        decode = (f"; decode {r['saap decode ms (by position)']:.3f} ms vs flash {r['dense flash decode ms']:.3f} ms"
                  if "dense flash decode ms" in r else "")
        print(f"saap {r['tokens']} tokens, q_block {r['q_block']}: {r['pairs computed / causal pairs']:.1%} of the "
              f"causal pairs computed, prefill {r['saap prefill ms (by position)']:.2f} ms (slots "
              f"{r['saap prefill ms (slots)']:.2f}) vs flash {r['dense flash ms']:.2f} ms{decode}")
    for name in [n for n in bench if isinstance(bench[n], dict) and "ffn in progress" in bench[n]]:
        r = bench[name]["ffn in progress"]  # a run cut short: what it timed before it stopped (unchecked)
        print(f"{name}, cut short at {r['tokens']} tokens (unchecked): "
              + "; ".join(f"{k[:-len(' fwd+bwd ms')]} {v:.3f} ms" for k, v in r.items() if k.endswith(" fwd+bwd ms")))


if __name__ == "__main__":
    main()
