"""Kernel micro-benchmarks (pytest-benchmark): every fvcompile op against its plain-PyTorch
reference and the PyTorch op that does the same job, forward, backward and both, over a few
shapes, with each step's peak memory in `extra_info`. Not part of `make test` (pyproject's
testpaths is tests/): run them with `make bench-micro` or `pytest bench/micro`. This file holds
what every benchmark file shares: the device, shapes and dtypes, and `measure`.

Each test's benchmark group is "<op> <direction> <shape>", so pytest-benchmark's table puts the
implementations of one op, direction and shape side by side.
"""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
# Timed calls per benchmark, after one untimed call (which compiles where an op compiles).
ROUNDS = {"cpu": 5, "cuda": 30}
# A few shapes per kind of op: small on CPU (the ops run their references there), the Llama-3-8B
# FFN and attention sizes on a GPU.
SHAPES = {
    "rows": {"cpu": [(256, 512), (1024, 1024)], "cuda": [(4096, 14336), (8192, 14336)]},  # (M, K)
    "matmul": {"cpu": [(256, 512, 256), (512, 1024, 512)], "cuda": [(8192, 14336, 4096), (8192, 4096, 14336)]},
    # (batch, query heads, key heads, tokens, head dim)
    "attention": {"cpu": [(1, 4, 2, 512, 64), (1, 4, 2, 1024, 64)],
                  "cuda": [(1, 32, 8, 8192, 128), (1, 32, 8, 32768, 128)]},
}
# Activations and weights in the dtype each device's kernels serve; the 2:4 packs take fp16/bf16.
FLOAT = torch.bfloat16 if DEVICE == "cuda" else torch.float32
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def shapes(kind: str) -> list:
    return SHAPES[kind][DEVICE]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def measure(benchmark, group: str, fn, inputs: list, direction: str) -> None:
    """Time `fn(*inputs)` in one direction (fwd: under no_grad; bwd: the backward of one forward,
    kept; fwd+bwd: both) with pytest-benchmark, and record one step's peak memory."""
    from fvcompile.bench.measure import peak_step_bytes

    grads_of = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if direction != "fwd" and not grads_of:
        pytest.skip("no input takes a gradient here")

    def clear():
        for x in grads_of:
            x.grad = None

    if direction == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
            sync()
    elif direction == "fwd+bwd":
        def step():
            clear()
            out = _first_tensor(fn(*inputs))
            out.backward(torch.ones_like(out))
            sync()
    else:
        out = _first_tensor(fn(*inputs))
        seed = torch.ones_like(out)

        def step():
            clear()
            out.backward(seed, retain_graph=True)
            sync()
    step()  # the untimed first call (an op that compiles does it here)
    benchmark.group = group
    benchmark.extra_info["peak_mb"] = round(peak_step_bytes(step, torch.device(DEVICE)) / 2**20, 3)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    benchmark.pedantic(step, rounds=ROUNDS[DEVICE], iterations=1, warmup_rounds=1)


def needs(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)
