import os

import torch

# Triton reads TRITON_INTERPRET when a kernel's @triton.jit runs: set it before any test imports
# a kernel, so that kernels run in the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
