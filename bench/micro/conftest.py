"""Kernel micro-benchmarks, run by hand (`make bench-micro`; not part of `make test`, whose
testpaths is tests/). The helpers are in microbench.py."""
import os

import torch

# The Triton kernels run in the interpreter where there is no GPU (the ops themselves take their
# reference on CPU tensors); set before any kernel's @triton.jit runs (tests/conftest.py says why).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
