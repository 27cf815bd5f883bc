"""Every Triton kernel compiles for the GPUs it is meant for (sm80, sm90), on a machine without one.

The interpreter tests (TRITON_INTERPRET=1) run the kernels' Python, not Triton's compiler: a kernel
the compiler rejects (an unsupported construct, a type it will not cast, an FP8 store on sm80)
passes them and fails only on a GPU, whose time is short. Triton compiles down to a cubin without
a GPU, so this file launches every kernel the way our ops do, with the launch replaced by a
compile for each target. It runs in child processes (two, each compiling every other variant):
Triton decides at `@triton.jit` time whether a kernel is interpreted, and this test run's kernels
are (tests/conftest.py). The children start when the test session starts (tests/conftest.py calls
`start_in_background`), at low priority: they compile on the core that the rest of the run, mostly
one Python thread, leaves idle, and the test waits for them where it runs.

Compiled with this machine's Triton, not the GPU machine's (3.6): a version-specific failure can
still pass here. Not part of `make test` (marked `gpu_compile`: more CPU time than CI's budget
holds); `make gpu-compile` runs it with the GPU machine's Triton before a GPU session, and
`pytest -m gpu_compile` with this one.
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

SM80, SM90 = 80, 90

TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float8_e4m3fn": "fp8e4nv",
                "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Triton's signature (name -> type) and constexprs (name -> value) of one launch."""
    import torch

    params = inspect.signature(fn.fn)
    bound = params.bind(*args, **kwargs)
    signature, constexprs = {}, {}
    for name, param in params.parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no Triton type for argument {name}={value!r}")
    return signature, constexprs


def compile_every_kernel(part: int = 0, parts: int = 1) -> None:
    """Run every kernel launch of our ops with the launch replaced by compiles; print one line each.
    part/parts: compile only every parts-th variant from the part-th on (the others seen, skipped),
    so that several processes share the work."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from fvcompile.kernels import sparse24, sparse24_cslt, sparse24_cutlass, sparse24_fp8

    targets: list[int] = []  # the compute capabilities the next launches compile for
    done: set[tuple] = set()  # every variant seen, compiled here or by another part
    compiled_here = 0

    def compile_instead(self, *args, grid, warmup, **kwargs):
        nonlocal compiled_here
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        signature, constexprs = _signature(self, args, kwargs)
        for cc in targets:
            key = (self.__name__, tuple(signature.items()), tuple(constexprs.items()), cc)
            if key in done:
                continue
            done.add(key)
            if (len(done) - 1) % parts != part:
                continue
            compiled_here += 1
            src = ASTSource(fn=self, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
            assert compiled.asm.get("cubin"), f"{self.__name__}: no cubin for sm{cc}"
            shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
            print(f"sm{cc} {self.__name__}({', '.join(t for t in signature.values() if t != 'constexpr')}; {shown})",
                  flush=True)

    JITFunction.run = compile_instead

    def x(*shape, dtype=torch.bfloat16):  # never read: no kernel runs
        return torch.empty(*shape, dtype=dtype)

    # Every GPU with 2:4 sparse tensor cores: the selection, and CUTLASS's layout (sm8x's matmul).
    targets[:] = [SM80, SM90]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        sparse24.sparse24_relu_triton(x(64, 256, dtype=dtype))
        sparse24.sparse24_relu_max_triton(x(64, 256, dtype=dtype))
        sparse24.sparse24_select_triton(x(64, 256, dtype=dtype))
        sparse24.sparse24_select_triton(x(256, 64, dtype=dtype).t())  # along tokens: a transposed view
        sparse24.sparse24_select_triton(x(64, 512, dtype=dtype)[:, ::2])  # no unit stride at all
    for dtype in (torch.float16, torch.bfloat16):
        for bm, bk in ((32, 128), (16, 256), (64, 64), (32, 256)):  # the parts bench's tile shapes
            sparse24_cutlass.relu2_sparse24_pack_triton(x(64, 256, dtype=dtype), block_m=bm, block_k=bk)
        sparse24_cutlass.sparse24_pack_triton(x(64, 256, dtype=dtype))
        sparse24_cutlass.sparse24_pack_triton(x(256, 64, dtype=dtype).t())
        sparse24_cutlass.sparse24_pack_triton(x(64, 512, dtype=dtype)[:, ::2])
    # Hopper (cuSPARSELt's layout and FP8; e4m3 needs sm89+).
    targets[:] = [SM90]
    for dtype in (torch.float16, torch.bfloat16):
        for square, relu, strided_k in ((False, False, False), (True, False, False), (True, True, False),
                                        (False, False, True), (True, False, True)):
            sparse24_cslt.cslt_pack_triton(x(64, 256, dtype=dtype), square, relu, strided_k=strided_k)
            scale = x(64, dtype=torch.float32)
            sparse24_cslt.cslt_pack_triton(x(64, 256, dtype=dtype), square, relu, out_dtype=sparse24_fp8.FP8,
                                           scale=scale, strided_k=strided_k)
            if strided_k:  # as the weight gradients run it: rᵀ, a transposed view
                sparse24_cslt.cslt_pack_triton(x(256, 64, dtype=dtype).t(), square, relu, strided_k=True)
                sparse24_cslt.cslt_pack_triton(x(256, 64, dtype=dtype).t(), square, relu, out_dtype=sparse24_fp8.FP8,
                                               scale=scale, strided_k=True)
        for bm, bk in ((32, 128), (64, 64), (32, 256), (64, 128)):
            sparse24_cslt.cslt_pack_triton(x(64, 256, dtype=dtype), block_m=bm, block_k=bk)
        sparse24_cslt.cslt_pack_triton(x(64, 512, dtype=dtype)[:, ::2])
        one = x(1, dtype=torch.float32)
        for strided_k in (False, True):
            sparse24_fp8.quantize_column_major_triton(x(256, 64, dtype=dtype), one, strided_k=strided_k, n_multiple=16)
        sparse24_fp8.quantize_column_major_triton(x(64, 256, dtype=dtype).t(), one)  # W2ᵀ: a transposed view
        for transpose_out in (False, True):
            sparse24_fp8.rescale_triton(x(64, 32), x(64, dtype=torch.float32), one, transpose_out, dtype)
    print(f"compiled {compiled_here} of {len(done)} kernel variants with Triton {triton.__version__}", flush=True)


PARTS = 2  # child processes, each compiling every other variant: CI has two cores
TEST_NAME = "test_every_kernel_compiles_for_sm80_and_sm90"
_STASH = pytest.StashKey[list]()


def start_in_background(config, items=(), nice: int = 10) -> None:
    """Start the compiling children now (at `nice`), for the test to wait on when it runs.
    Their Triton cache is a fresh folder (a real compile, not a cache hit from an earlier run),
    removed with their output when the session ends; children still running then are killed."""
    if sys.platform != "linux" or config.stash.get(_STASH, None) is not None:
        return
    folder = Path(tempfile.mkdtemp(prefix="fvcompile-gpu-compile-"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's current default, stated (it warns otherwise)
    children = []
    for part in range(PARTS):
        out, err = (open(folder / f"part{part}.{name}", "w+") for name in ("out", "err"))
        proc = subprocess.Popen([sys.executable, __file__, str(part), str(PARTS)], env=env, stdout=out,
                                stderr=err, text=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)
        children.append((proc, out, err))
    config.stash[_STASH] = children

    def stop():
        for proc, out, err in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
        shutil.rmtree(folder, ignore_errors=True)

    config.add_cleanup(stop)


@pytest.mark.gpu_compile
@pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA toolchain (ptxas) ships for Linux")
def test_every_kernel_compiles_for_sm80_and_sm90(request):
    start_in_background(request.config, nice=0)  # unless the session started them already
    children = request.config.stash[_STASH]
    for proc, _, _ in children:  # waited on now: back to normal priority, where allowed
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
        except (PermissionError, ProcessLookupError):
            pass
    compiled = 0
    for proc, out, err in children:
        proc.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
        words = stdout.splitlines()[-1].split()  # "compiled N of M kernel variants ..."
        compiled, total = compiled + int(words[1]), int(words[3])
    assert compiled == total > 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    compile_every_kernel(*(int(a) for a in sys.argv[1:3]))
